"""The dataset catalog: domain → datasets → categories → root URI (DESIGN.md §5), as YAML or JSON.

Example::

    version: 1
    domains:
      industrial:
        datasets:
          mvtec_ad:
            root: s3://data/mvtec_ad            # MVTec-layout tree the manifest is built from
            categories: [bottle, carpet]        # omitted or null: every category found under root
          visa:
            format: visa                        # native layout of `source`; its importer writes `root`
            source: s3://raw/VisA
            root: s3://data/visa_mvtec
      logical:
        datasets:
          loco:
            format: mvtec_loco
            root: ./mvtec_loco                  # relative roots resolve against the catalog's folder
            default_defect_group: null
            categories:                         # a mapping overrides the root per category
              breakfast_box: null               #   null: <root>/breakfast_box
              pushpins: s3://other/loco         #   <that root>/pushpins

``format`` names the native layout (``mvtec``, ``mvtec3d``, ``visa``, ``mvtec_loco``, ``bmad``, ``ped2``);
``root`` is always the MVTec-layout tree. ``Catalog.import_sources()`` runs each dataset's importer from
``source`` into ``root`` (idempotent); ``Catalog.build_manifest()`` walks the roots into one manifest.
``${VAR}`` and ``~`` are expanded in URIs.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal

import pandas as pd
import yaml
from pydantic import Field, ValidationError, field_validator

from anomalymoe.platform.data import storage
from anomalymoe.platform.data.manifest import (
    ValidationReport,
    build_manifest_from_mvtec,
    concat_manifests,
    normalize_root,
    validate_manifest,
)
from anomalymoe.strict import Strict

__all__ = ["Catalog", "CatalogError", "DatasetSpec", "DomainSpec", "demo_catalog", "load_catalog", "save_catalog"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
Format = Literal["mvtec", "mvtec3d", "visa", "mvtec_loco", "bmad", "ped2"]


class CatalogError(ValueError):
    """A catalog that cannot be read or does not fit the schema."""


def _check_name(v: str, what: str) -> str:
    if not _NAME.match(v):
        raise ValueError(f"{what} name {v!r} must match {_NAME.pattern}")
    return v


class DatasetSpec(Strict):

    root: str = Field(description="MVTec-layout root of this dataset (path or s3://)")
    format: Format = Field("mvtec", description="native layout of `source`, i.e. which importer makes `root`")
    source: str | None = Field(None, description="native-layout tree to import into `root`; None: already there")
    categories: list[str] | dict[str, str | None] | None = Field(
        None, description="categories to use (None: all found); a mapping gives a root per category")
    pixel_gt: bool = Field(True, description="anomalous images have pixel masks (validation requires them)")
    default_defect_group: str | None = Field(
        None, description="defect_group for defects that the category's defect_groups.json does not list")
    import_options: dict[str, Any] = Field(default_factory=dict, description="extra keyword args of the importer")

    @field_validator("categories")
    @classmethod
    def _categories(cls, v):
        if v is None:
            return v
        names = list(v)
        if not names:
            raise ValueError("categories must not be empty (omit it to use every category found)")
        if isinstance(v, list) and len(set(v)) != len(v):
            raise ValueError(f"duplicate categories in {v}")
        for c in names:
            _check_name(c, "category")
        return v

    def category_roots(self) -> dict[str, list[str] | None]:
        """root -> categories under it (None: discover all)."""
        if self.categories is None:
            return {self.root: None}
        if isinstance(self.categories, list):
            return {self.root: list(self.categories)}
        out: dict[str, list[str]] = {}
        for cat, root in self.categories.items():
            out.setdefault(root or self.root, []).append(cat)
        return out


class DomainSpec(Strict):

    datasets: dict[str, DatasetSpec]

    @field_validator("datasets")
    @classmethod
    def _datasets(cls, v):
        if not v:
            raise ValueError("a domain needs at least one dataset")
        for name in v:
            _check_name(name, "dataset")
        return v


class Catalog(Strict):

    version: Literal[1] = 1
    domains: dict[str, DomainSpec]

    @field_validator("domains")
    @classmethod
    def _domains(cls, v):
        if not v:
            raise ValueError("the catalog lists no domains")
        for name in v:
            _check_name(name, "domain")
        return v

    def datasets(self, domains: Iterable[str] | None = None) -> Iterator[tuple[str, str, DatasetSpec]]:
        """(domain, dataset, spec), in catalog order, optionally for some domains only."""
        wanted = None if domains is None else list(domains)
        if wanted is not None:
            unknown = sorted(set(wanted) - set(self.domains))
            if unknown:
                raise CatalogError(f"unknown domain(s) {unknown}; the catalog has {sorted(self.domains)}")
        for d, spec in self.domains.items():
            if wanted is None or d in wanted:
                for name, ds in spec.datasets.items():
                    yield d, name, ds

    def build_manifest(self, domains: Iterable[str] | None = None) -> pd.DataFrame:
        """One manifest for every dataset (of the given domains), rows sorted by domain/dataset/category/split."""
        frames = []
        for domain, name, ds in self.datasets(domains):
            for root, cats in ds.category_roots().items():
                frames.append(build_manifest_from_mvtec(root, domain, name, cats,
                                                        default_defect_group=ds.default_defect_group))
        df = concat_manifests(frames)
        if not len(df):
            raise CatalogError("the catalog's roots hold no images")
        return df

    def no_pixel_gt(self) -> set[str]:
        return {name for _, name, ds in self.datasets() if not ds.pixel_gt}

    def validate_manifest(self, df: pd.DataFrame, **kwargs) -> ValidationReport:
        """``validate_manifest`` with this catalog's knowledge of which datasets have pixel masks."""
        return validate_manifest(df, no_pixel_gt=self.no_pixel_gt(), **kwargs)

    def import_sources(self, domains: Iterable[str] | None = None, *, max_workers: int = 8) -> dict:
        """Run every dataset's importer from ``source`` into ``root``; datasets without a source are skipped."""
        from anomalymoe.platform.data.importers import run_importer

        out = {}
        for domain, name, ds in self.datasets(domains):
            if ds.source is None:
                continue
            opts = {"max_workers": max_workers, **ds.import_options}
            if isinstance(ds.categories, list):
                opts.setdefault("categories", ds.categories)
            out[f"{domain}/{name}"] = run_importer(ds.format, ds.source, ds.root, **opts)
        return out

    def resolved(self, base: str | None) -> Catalog:
        """A copy with ``${VAR}``/``~`` expanded and relative local roots resolved against ``base``."""

        def fix(uri: str | None) -> str | None:
            if uri is None:
                return None
            uri = os.path.expandvars(uri)
            if storage.is_s3(uri):
                return uri.rstrip("/")
            uri = os.path.expanduser(uri)
            if not os.path.isabs(uri) and base is not None:
                return storage.join(base, uri) if storage.is_s3(base) else os.path.normpath(os.path.join(base, uri))
            return normalize_root(uri)

        data = self.model_dump()
        for dom in data["domains"].values():
            for ds in dom["datasets"].values():
                ds["root"] = fix(ds["root"])
                ds["source"] = fix(ds["source"])
                if isinstance(ds["categories"], dict):
                    ds["categories"] = {c: fix(r) for c, r in ds["categories"].items()}
        return Catalog.model_validate(data)


def _parse(text: str, uri: str) -> Catalog:
    try:
        data = yaml.safe_load(text)  # YAML 1.1 is a superset of the JSON we write
    except yaml.YAMLError as e:
        raise CatalogError(f"{uri}: not valid YAML/JSON: {e}") from e
    if not isinstance(data, dict):
        raise CatalogError(f"{uri}: expected a mapping with 'domains', got {type(data).__name__}")
    try:
        return Catalog.model_validate(data)
    except ValidationError as e:
        raise CatalogError(f"{uri}: invalid catalog:\n{e}") from e


def load_catalog(uri: str | os.PathLike[str]) -> Catalog:
    """Read a catalog (YAML or JSON, local or s3://); relative roots resolve against the catalog's folder."""
    uri = os.fspath(uri)
    catalog = _parse(storage.read_text(uri), uri)
    base = storage.parent(uri) if storage.is_s3(uri) else os.path.dirname(os.path.abspath(uri))
    return catalog.resolved(base)


def save_catalog(catalog: Catalog, uri: str | os.PathLike[str]) -> None:
    uri = os.fspath(uri)
    data = catalog.model_dump(exclude_defaults=False)
    if uri.lower().endswith(".json"):
        text = json.dumps(data, indent=2) + "\n"
    else:
        text = yaml.safe_dump(data, sort_keys=False)
    storage.write_text(uri, text)


def demo_catalog(root: str | os.PathLike[str], domains: Sequence[str] = ("textures", "objects")) -> Catalog:
    """The built-in demo data: ``textures`` (dataset ``demo_textures`` at ``<root>/textures``) and ``objects``
    (dataset ``demo_objects`` at ``<root>/objects``); categories are whatever the trees hold."""
    root = normalize_root(root)
    known = {
        "textures": ("demo_textures", storage.join(root, "textures")),
        "objects": ("demo_objects", storage.join(root, "objects")),
    }
    unknown = sorted(set(domains) - set(known))
    if unknown:
        raise CatalogError(f"unknown demo domain(s) {unknown}; known: {sorted(known)}")
    return Catalog(domains={
        d: DomainSpec(datasets={known[d][0]: DatasetSpec(root=known[d][1])}) for d in domains
    })
