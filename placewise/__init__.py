"""placewise: device placement, pipelines, async SGD and optimizer fusion.

`placewise.parallelize(module, example_inputs, ...)` (see `placewise.parallel`) is imported on first use,
so `import placewise` stays free of torch.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "parallelize":
        from placewise.parallel import parallelize
        return parallelize
    raise AttributeError(f"module 'placewise' has no attribute {name!r}")
