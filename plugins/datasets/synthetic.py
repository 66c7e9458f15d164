"""Dataset source ``synthetic``: seeded Llama 2 chat texts, for benchmarks that must not download anything.

Speed and memory depend on how many tokens a batch holds and how unequal its rows are, not on what the words
say. The lengths follow the shape of guanaco-llama2-1k (the reference recipe's data): a log-normal with a
mean near 350 tokens and a long tail, cut at ``max_tokens``. Each row is one pre-formatted Llama 2 turn,
``<s>[INST] question [/INST] answer </s>``, with words drawn from a fixed list, so the ``llama2`` template
parses it like the real data and every tokenizer sees ordinary English words.

With ``preference = true`` each row is a preference pair for DPO instead (``prompt``, ``chosen``, ``rejected``, the
``preference`` format): a question of about ``mean_prompt_tokens`` and two answers whose lengths each follow the
log-normal above, so a pair's longer sequence is what the memory planner's ``data.max_length`` has to hold.
"""

from __future__ import annotations

import math
import random

from pydantic import Field

import fx
from fx.sources import DatasetSource

WORDS = (
    "the of and to in is that it was for on are as with his they at be this from have or by one had not but what "
    "all were when we there can an your which their said if do will each about how up out them then she many some "
    "so these would other into has more her two like him see time could no make than first been its who now people "
    "my made over did down only way find use may water long little very after words called just where most know "
    "get through back much before go good new write our used me man too any day same right look think also around "
    "another came come work three word must because does part even place well such here take why things help put "
    "years different away again off went old number great tell men say small every found still between name should "
    "home big give air line set own under read last never us left end along while might next sound below saw "
    "something thought both few those always looked show large often together asked house world going want school "
    "important until form food keep children feet land side without boy once animals life enough took sometimes "
    "four head above kind began almost live page got earth need far hand high year mother light parts country "
    "father let night following picture being study second eyes soon times story boys since white days ever paper "
    "hard near sentence better best across during today others however sure means knew try told young miles sun "
    "ways thing whole hear example heard several change answer room sea against top turned learn point city play "
    "toward five using himself usually money seen car morning body upon family later turn move face door cut done "
    "group true leave color red friends easy problem explain language model training memory budget question"
).split()

TOKENS_PER_WORD = 1.03  # the cut llama2-7b tokenizer on WORDS with this markup (measured; docs/benchmarks.md)


class SyntheticDataset(DatasetSource):
    description = "seeded synthetic Llama 2 chat texts with guanaco-llama2-1k's length distribution (no download)"

    class Settings(DatasetSource.Settings):
        rows: int = Field(1000, ge=1, le=1_000_000)
        seed: int = Field(0, ge=0, le=2**32 - 1)
        mean_tokens: float = Field(350, gt=8, le=100_000)
        sigma: float = Field(0.65, ge=0, le=3)
        max_tokens: int = Field(1000, ge=16, le=1_000_000)
        preference: bool = False  # rows of (prompt, chosen, rejected); mean_tokens is then each answer's length
        mean_prompt_tokens: float = Field(150, gt=2, le=100_000)  # preference rows: the prompt's mean length

    def lengths(self) -> list[int]:
        """Each row's target length in tokens: log-normal with the configured mean, cut at ``max_tokens``."""
        s = self.settings
        rng = random.Random(s.seed)
        mu = math.log(s.mean_tokens) - s.sigma**2 / 2
        return [max(16, min(s.max_tokens, round(rng.lognormvariate(mu, s.sigma)))) for _ in range(s.rows)]

    def words(self, rng: random.Random, tokens: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(max(1, round(tokens / TOKENS_PER_WORD)))).capitalize()

    def preference_rows(self):
        """Preference pairs: a prompt of log-normal length around ``mean_prompt_tokens`` and two answers."""
        import datasets

        s = self.settings
        rng = random.Random(s.seed + 1)
        mu = math.log(s.mean_prompt_tokens) - s.sigma**2 / 2
        answers = self.lengths()
        rows = {"prompt": [], "chosen": [], "rejected": []}
        for chosen in answers:
            prompt = max(3, min(s.max_tokens, round(rng.lognormvariate(mu, s.sigma))))
            rejected = answers[rng.randrange(len(answers))]
            rows["prompt"].append(self.words(rng, prompt) + "?")
            rows["chosen"].append(self.words(rng, chosen) + ".")
            rows["rejected"].append(self.words(rng, rejected) + ".")
        return datasets.Dataset.from_dict(rows), None

    def load(self):
        import datasets

        if self.settings.preference:
            return self.preference_rows()
        rng = random.Random(self.settings.seed + 1)
        texts = []
        for tokens in self.lengths():
            words = max(6, round(tokens / TOKENS_PER_WORD) - 8)  # the markup takes about 10 tokens
            asked = max(3, words // 8)
            question = " ".join(rng.choice(WORDS) for _ in range(asked))
            answer = " ".join(rng.choice(WORDS) for _ in range(words - asked))
            texts.append(f"<s>[INST] {question.capitalize()}? [/INST] {answer.capitalize()}. </s>")
        return datasets.Dataset.from_dict({"text": texts}), None


@fx.hookimpl
def fx_register_datasets(register):
    register("synthetic", SyntheticDataset)
