"""Dataset source ``hub``: a dataset on the Hugging Face hub (needs network access to the hub)."""

from __future__ import annotations

from pydantic import Field

import fx
from fx.errors import UserError
from fx.sources import DatasetSource


class HubDataset(DatasetSource):
    description = "a dataset on the Hugging Face hub, by name"

    class Settings(DatasetSource.Settings):
        name: str = Field(min_length=1, max_length=512)
        subset: str | None = None
        split: str = "train"
        eval_split: str | None = None
        revision: str | None = None

    def _split(self, split: str):
        import datasets

        s = self.settings
        try:
            return datasets.load_dataset(s.name, s.subset, split=split, revision=s.revision)
        except Exception as exc:
            raise UserError(
                f"data.name: cannot load {s.name!r} split {split!r} from the hub: {type(exc).__name__}: "
                f"{(str(exc).splitlines() or [''])[0][:300]}"
            ) from None

    def load(self):
        train = self._split(self.settings.split)
        held_out = self._split(self.settings.eval_split) if self.settings.eval_split else None
        return train, held_out


@fx.hookimpl
def fx_register_datasets(register):
    register("hub", HubDataset)
