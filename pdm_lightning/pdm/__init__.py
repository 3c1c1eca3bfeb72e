"""PDM teacher features: the query capture hook, DDIM inversion, the on-disk query bank and the teacher."""

from pdm_lightning.pdm.bank import (
    BankSettings,
    BuildReport,
    QueryBank,
    build_bank,
    class_condition,
    cache_folder,
    default_cache_root,
    ensure_cached_bank,
    open_bank,
)
from pdm_lightning.pdm.capture import DEFAULT_PDM_LAYER, QueryCapture, adapters_disabled
from pdm_lightning.pdm.integrity import BankDamagedError, find_damage
from pdm_lightning.pdm.inversion import trajectory_timesteps
from pdm_lightning.pdm.teacher import unet_query_fn

__all__ = [
    "DEFAULT_PDM_LAYER",
    "BankDamagedError",
    "BankSettings",
    "BuildReport",
    "QueryBank",
    "QueryCapture",
    "adapters_disabled",
    "build_bank",
    "cache_folder",
    "class_condition",
    "default_cache_root",
    "ensure_cached_bank",
    "find_damage",
    "open_bank",
    "trajectory_timesteps",
    "unet_query_fn",
]
