"""How an index stores its model's fine codes: one value per code, or 4-bit codes two per byte.

A model with 16 codewords per subquantizer makes 4-bit codes. An index stores them packed
(``packed``) when M is a multiple of 4: M/2 bytes, codes 2j and 2j + 1 in byte j, low nibble
first, so each half's codes fill whole bytes (the search scores a half with its centroid's
tables). Other models, 4-bit models with M = 4k + 2, and indexes made with
``pack_codes=False`` (readable by cypq 0.2) store one value of the code dtype per code.

The storage sees only widths and dtypes; a packed index also names the storage feature
``PACKED4`` so that a cypq which cannot read packed codes refuses the index instead of
misreading it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .storage.base import PACKED4, IndexFormatError


@dataclass(frozen=True)
class CodeLayout:
    """The stored form of a model's fine codes.

    Attributes
    ----------
    M : int
        Fine codes per entry.
    packed : bool
        4-bit codes two per byte.
    width : int
        Stored values per entry: M, or M / 2 when packed.
    dtype : numpy.dtype
        Of the stored values (uint8 when packed).
    """
    M: int
    packed: bool
    width: int
    dtype: np.dtype

    @classmethod
    def for_model(cls, model, pack_codes: Optional[bool] = None) -> "CodeLayout":
        """The layout a new index of ``model`` uses: packed when the model's codes are 4-bit
        (16 codewords) and M is a multiple of 4, unless ``pack_codes`` is False;
        ``pack_codes=True`` for another model is a ValueError."""
        packable = model.subquantizer_clusters == 16 and model.M % 4 == 0
        if pack_codes and not packable:
            raise ValueError(f"pack_codes=True needs 4-bit codes (16 codewords per "
                             f"subquantizer, this model has {model.subquantizer_clusters}) "
                             f"and M a multiple of 4 (M={model.M}), so that each half's "
                             "codes fill whole bytes")
        return cls._of(model, packable if pack_codes is None else bool(pack_codes))

    @classmethod
    def of_storage(cls, model, storage, where: str) -> "CodeLayout":
        """The layout of an existing index's codes, checked against its model
        (IndexFormatError when they do not fit)."""
        packed = PACKED4 in storage.features
        layout = cls._of(model, packed)
        if (model.V * model.V, layout.width, layout.dtype) != (
                storage.n_cells, storage.code_width, storage.code_dtype) or (
                packed and (model.subquantizer_clusters != 16 or model.M % 4)):
            kind = "4-bit packed, " if packed else ""
            raise IndexFormatError(
                f"the model inside {where} (V={model.V}, M={model.M}, "
                f"{model.subquantizer_clusters} codewords) does not fit its codes ({kind}"
                f"{storage.n_cells} cells, {storage.code_width} x {storage.code_dtype}): "
                "the index is damaged")
        return layout

    @classmethod
    def _of(cls, model, packed: bool) -> "CodeLayout":
        if packed:
            return cls(model.M, True, model.M // 2, np.dtype(np.uint8))
        return cls(model.M, False, model.M, np.dtype(model.fine_code_dtype))

    @property
    def features(self) -> tuple:
        """Storage features an index of this layout needs."""
        return (PACKED4,) if self.packed else ()

    def pack(self, fine: np.ndarray) -> np.ndarray:
        """fine (n, M) codes (validated: < 16 when packed) -> (n, width) stored values."""
        if not self.packed:
            return np.ascontiguousarray(fine, dtype=self.dtype)
        nib = np.asarray(fine, dtype=np.uint8)
        return np.ascontiguousarray(nib[:, 0::2] | (nib[:, 1::2] << 4))

    def unpack(self, stored: np.ndarray) -> np.ndarray:
        """(n, width) stored values -> (n, M) codes (uint8 when packed)."""
        if not self.packed:
            return stored
        b = np.asarray(stored, dtype=np.uint8)
        nib = np.empty((b.shape[0], self.M), dtype=np.uint8)
        nib[:, 0::2] = b & 15
        nib[:, 1::2] = b >> 4
        return nib
