"""ovtasks: LAION image-caption shards to open-vocabulary instance segmentation models.

One subpackage per pipeline stage, each exposing plain functions over typed inputs (URIs, frozen
dataclasses, config objects): ``ingest`` → ``pseudolabel`` (``maskfree``, ``grounded``) → ``validate`` →
``train`` → ``evaluate`` → ``registry``; ``core`` and ``data`` below them, ``models`` the networks,
``report`` the pictures, ``orchestration`` / ``cli`` / ``ui`` on top. ``dags/`` wires the stages into
Airflow; nothing here imports Airflow at module level.
"""

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"


class _LegacyModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Registered model versions logged before the package layout pickled their pyfunc against
    ``ovtasks.serving``; that name resolves to the module it became, so those versions still load."""

    NAMES = {"ovtasks.serving": "ovtasks.registry.serving"}

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in self.NAMES else None

    def create_module(self, spec):
        return None  # the default module; exec_module fills it with the new module's objects (the same ones)

    def exec_module(self, module):
        target = importlib.import_module(self.NAMES[module.__name__])
        module.__dict__.update({k: v for k, v in vars(target).items() if not k.startswith("__")})


sys.meta_path.append(_LegacyModules())
