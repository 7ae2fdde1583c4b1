"""The simulated executor's torch-free parts: device profiles and the step cost model."""

from pagedllm.sim.cost_model import (
    CostModel, DeviceProfile, ModelShape, StepShape, load_profile,
)

__all__ = ["CostModel", "DeviceProfile", "ModelShape", "StepShape", "load_profile"]
