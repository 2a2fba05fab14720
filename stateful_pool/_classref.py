"""How a worker class reaches a spawned worker process.

With the ``spawn`` start method (needed for CUDA) a worker process starts a fresh interpreter
and must rebuild the worker class. A class in an importable module travels by reference
(module and qualified name) and is imported in the child, inside the worker's own error
handling, so a failure to import it comes back to the parent as a ``SpawnError`` naming the
class instead of a child that dies with exit code 1.

A class the child cannot import (defined in ``python -c``, in a script piped to ``python -``,
in a notebook or REPL, or inside a function) travels by value, pickled with ``cloudpickle``
when it is installed. Without it, ``SPool(...)`` raises a ``TypeError`` that names the class
and both fixes.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import sys
import threading
from collections.abc import Iterator
from typing import Any

ByRef = tuple[str, str]  # (module, qualname)
ClassRef = ByRef | bytes  # bytes: the class pickled by value

_MAIN_LOCK = threading.Lock()


def _main_file_is_real() -> bool:
    """Whether a spawned child can import ``__main__`` again (a script file or ``-m``)."""
    main = sys.modules.get("__main__")
    if main is None:
        return False
    if getattr(getattr(main, "__spec__", None), "name", None):
        return True
    path = getattr(main, "__file__", None)
    return isinstance(path, str) and os.path.isfile(path)


def _lookup(module_name: str, qualname: str) -> Any:
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def is_importable(cls: type) -> bool:
    """Whether a new process can import ``cls`` by its module and name."""
    if "<locals>" in cls.__qualname__:
        return False
    if cls.__module__ == "__main__" and not _main_file_is_real():
        return False
    try:
        return _lookup(cls.__module__, cls.__qualname__) is cls
    except Exception:
        return False


def class_ref(cls: type) -> ClassRef:
    """What to send a spawned child so that it can rebuild ``cls``; raises ``TypeError``
    naming the class and the fix when neither way works."""
    if is_importable(cls):
        return (cls.__module__, cls.__qualname__)
    where = ("inside a function" if "<locals>" in cls.__qualname__ else
             f"in module {cls.__module__!r}, which a new process cannot import "
             "(python -c, stdin, a notebook or a REPL)")
    try:
        import cloudpickle  # type: ignore[import-not-found,import-untyped,unused-ignore]
    except ImportError:
        raise TypeError(
            f"worker class {cls.__qualname__} is defined {where}, so spawned worker processes "
            "cannot import it. Either move it to a module file and import it from there, or "
            "install cloudpickle (pip install 'stateful-pool[interactive]') so that the pool "
            "sends the class by value.") from None
    try:
        return bytes(cloudpickle.dumps(cls, protocol=pickle.HIGHEST_PROTOCOL))
    except Exception as exc:
        raise TypeError(
            f"worker class {cls.__qualname__} is defined {where}, and cloudpickle could not "
            f"send it by value: {exc!r}. Move it to a module file and import it from "
            "there.") from exc


def load_class(ref: ClassRef) -> type:
    """Rebuild the worker class in the child (raises with a message naming the class)."""
    if isinstance(ref, bytes):
        cls = pickle.loads(ref)
    else:
        module_name, qualname = ref
        try:
            cls = _lookup(module_name, qualname)
        except Exception as exc:
            raise ImportError(
                f"the worker process could not import worker class {qualname} from module "
                f"{module_name!r}: {exc!r}. Define it at module level of an importable file, "
                "outside any `if __name__ == '__main__':` block.") from exc
    if not isinstance(cls, type):
        raise TypeError(f"worker class reference {ref!r} names a {type(cls).__name__}")
    return cls


@contextlib.contextmanager
def main_unreachable_hidden() -> Iterator[None]:
    """While a child process is started, hide a ``__main__.__file__`` that is not a file
    (``<stdin>``): ``multiprocessing``'s spawn would make the child run that path and die."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or path is None or _main_file_is_real():
        yield
        return
    with _MAIN_LOCK:
        del main.__file__
        try:
            yield
        finally:
            main.__file__ = path
