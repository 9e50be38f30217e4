"""UNet module paths in diffusers and SGM (Stability/kohya) names, for a UNet's block layout.

kohya files name UNet modules by SGM path, whose block numbers depend on how many resnets each
level has; the table itself is `sdxl.convert.unet_key_map`. Transformer insides keep their names.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from sdxl.convert import unet_key_map
from sdxl.models.configs import SDXL_BASE


@dataclass(frozen=True)
class UNetLayout:
    """The UNet block structure the diffusers <-> SGM block numbering depends on."""

    down_block_types: tuple[str, ...]
    up_block_types: tuple[str, ...]
    layers_per_block: tuple[int, ...]  # per level, top first

    @classmethod
    def from_config(cls, config: Mapping | object) -> UNetLayout:
        """From a diffusers UNet config dict or an object with those attributes (`unet.config`)."""

        def get(key):
            return config[key] if isinstance(config, Mapping) else getattr(config, key)

        downs, ups, layers = (
            get(k) for k in ("down_block_types", "up_block_types", "layers_per_block")
        )
        layers = (layers,) * len(downs) if isinstance(layers, int) else layers
        return cls(tuple(downs), tuple(ups), tuple(layers))

    def config(self) -> dict:
        """The diffusers config keys `sdxl.convert.unet_key_map` reads."""
        return {k: list(v) for k, v in asdict(self).items()}


SDXL_LAYOUT = UNetLayout.from_config(SDXL_BASE["unet"])


@functools.cache
def _key_maps(layout: UNetLayout) -> tuple[dict[str, str], dict[str, str]]:
    """diffusers -> SGM module prefixes (from sdxl.convert) and the inverse."""
    table = unet_key_map(layout.config())
    return table, {v: k for k, v in table.items()}


def _rename_module(path: str, table: dict[str, str]) -> str:
    """Rename `path` by its longest dotted prefix in `table` (transformer insides keep names)."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        head = ".".join(parts[:cut])
        if head in table:
            return ".".join([table[head], *parts[cut:]])
    raise ValueError(f"{path!r} is not a module of this UNet (or of this UNet layout)")


def diffusers_to_sgm(path: str, layout: UNetLayout = SDXL_LAYOUT) -> str:
    """SGM (Stability/kohya) module path of a diffusers UNet module path."""
    return _rename_module(path, _key_maps(layout)[0])


def sgm_to_diffusers(path: str, layout: UNetLayout = SDXL_LAYOUT) -> str:
    """Diffusers module path of an SGM UNet module path (inverse of diffusers_to_sgm)."""
    return _rename_module(path, _key_maps(layout)[1])
