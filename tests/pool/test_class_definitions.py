"""Worker classes defined where users define them: ``python -c``, a script piped to
``python -``, inside a function, a script's ``__main__`` block, a notebook-like ``__main__``.
Each runs in a real child interpreter, as the user would run it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from stateful_pool import SPool, SWorker

ROOT = Path(__file__).resolve().parents[2]

PROGRAM = textwrap.dedent("""
    from stateful_pool import SPool, SWorker

    class Doubler(SWorker):
        def spawn(self, base):
            self.base = base
            return "ready"

        def execute(self, x):
            return self.base + 2 * x

    with SPool(Doubler) as pool:
        print(pool.spawn(100), pool.execute(21), flush=True)
""")


def run_python(args: list[str], stdin: str | None = None, cwd: Path = ROOT,
               env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    return subprocess.run([sys.executable, *args], input=stdin, capture_output=True, text=True,
                          timeout=60, cwd=cwd, env=env)


def test_class_defined_in_python_dash_c():
    out = run_python(["-c", PROGRAM])
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ready", "142"]


def test_class_defined_in_a_script_piped_to_stdin():
    out = run_python(["-"], stdin=PROGRAM)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ready", "142"]


def test_class_defined_in_an_interactive_session():
    """What a REPL or notebook does: statements fed one by one to an interactive interpreter."""
    # The REPL ends a block at a blank line: no blank line inside the class.
    session = "\n".join(line for line in PROGRAM.splitlines() if line.strip()) + "\n"
    session = session.replace("\nwith SPool", "\n\nwith SPool") + "\n"
    out = run_python(["-i", "-q"], stdin=session)
    assert out.returncode == 0, out.stderr
    assert "ready 142" in out.stdout


def test_class_defined_inside_a_function(make_pool):
    def make_worker_class(offset):
        class Local(SWorker):
            def execute(self, x):
                return x + offset

        return Local

    pool = make_pool(make_worker_class(1000))
    pool.spawn()
    assert pool.execute(1) == 1001


TYPES_PROGRAM = textwrap.dedent("""
    from dataclasses import dataclass
    from stateful_pool import SPool, SWorker

    @dataclass
    class Request:
        text: str

    @dataclass
    class Prediction:
        label: str
        score: float

    class Refused(Exception):
        pass

    class Classifier(SWorker):
        def execute(self, request):
            if request.text == "":
                raise Refused("empty text")
            return Prediction(request.text.upper(), 0.5)

    with SPool(Classifier) as pool:
        pool.spawn()
        answer = pool.execute(Request("cat"))
        print(type(answer) is Prediction, answer.label, flush=True)
        try:
            pool.execute(Request(""))
        except Refused as exc:
            print("refused:", exc, flush=True)
""")


def test_types_defined_beside_the_worker_class_cross_both_ways():
    """In a notebook the request and answer types live in the notebook too: they must reach
    the worker and come back as the very classes the caller defined."""
    out = run_python(["-c", TYPES_PROGRAM])
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["True CAT", "refused: empty text"]


def test_without_cloudpickle_the_error_names_the_class_and_the_fix():
    program = "import sys; sys.modules['cloudpickle'] = None\n" + PROGRAM
    out = run_python(["-c", program])
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("TypeError: worker class Doubler is defined in module '__main__'")
    assert "move it to a module file" in last and "cloudpickle" in last


def test_class_hidden_in_a_scripts_main_block_fails_in_the_parent_with_its_name(tmp_path):
    """Defined under ``if __name__ == "__main__":`` a spawned child cannot see it; the caller
    learns why from pool.spawn(), not from a child's stderr."""
    script = tmp_path / "serve.py"
    script.write_text(textwrap.dedent("""
        from stateful_pool import SPool, SWorker

        if __name__ == "__main__":
            class Hidden(SWorker):
                def execute(self, x):
                    return x

            with SPool(Hidden) as pool:
                try:
                    pool.spawn()
                except Exception as exc:
                    print(f"{type(exc).__name__}: {exc}", flush=True)
    """))
    out = run_python([str(script)], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ImportError: the worker process could not import worker "
                                 "class Hidden from module '__main__'")
    assert "outside any `if __name__ == '__main__':` block" in out.stdout


def test_an_unpicklable_class_is_refused_before_anything_spawns():
    import threading

    lock = threading.Lock()

    class HoldsALock(SWorker):
        guard = lock

        def execute(self, x):
            return x

    with pytest.raises(TypeError, match="HoldsALock.*cloudpickle could not send it"):
        SPool(HoldsALock)
