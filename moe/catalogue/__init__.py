"""The per-star catalogue of ``predict``: masked pixels, the OOD score and flags (:mod:`moe.catalogue.predict`),
the flag word (:mod:`moe.catalogue.flags`) and the CSV / HDF5 / FITS files (:mod:`moe.catalogue.writers`)."""

from moe.catalogue.flags import CatalogueFlag

__all__ = ["CatalogueFlag"]
