"""The module path of the op being run, for the modes that attribute work to layers (flops, rf)."""

from __future__ import annotations

from torch.utils.module_tracker import ModuleTracker


class ModuleTracking:
    """Mixin for a TorchFunctionMode/TorchDispatchMode: `self.tracker.parents` names the modules
    currently running while the mode is active."""

    def __init__(self) -> None:
        super().__init__()
        self.tracker = ModuleTracker()

    def __enter__(self):
        self.tracker.__enter__()
        return super().__enter__()

    def __exit__(self, *args):
        super().__exit__(*args)
        self.tracker.__exit__(*args)
