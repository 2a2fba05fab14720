"""The serving core and what it stands on; no web framework in this package.

``core`` (``ServingCore``: one request path for every protocol, ``ServedModel``),
``declaration`` (a worker class's request and answer types), ``errors`` (``ServingError``,
load shedding), ``lifetime`` (deadline, client departure), ``state`` (the pool and its
lifespan), ``plan`` (which workers, where), ``shell`` (the worker's logging and tracing shell),
``cluster`` (Ray).
"""

from .core import ServedModel, ServingCore
from .declaration import Declaration, declaration_of
from .errors import ServingError
from .lifetime import Lifetime

__all__ = ["Declaration", "Lifetime", "ServedModel", "ServingCore", "ServingError",
           "declaration_of"]
