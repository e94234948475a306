"""Contradictory labels in a set of pairs: a pair whose twin prefers its rejected response over its chosen
one. `joint` counts them in its union (seqdpo/strategies/__init__.py): it cannot fit both members.

The twin is sought by a pair's key (what the preference can depend on), chosen and rejected swapped:

- any dataset: the same prompt with the same two responses swapped;
- the synthetic world (seqdpo/data/synthetic.py), whose preferences see nothing but the attributes whose
  marker words a response holds and its length: the same attributes and the same length order swapped,
  whatever the prompt and the other words. In the `conflicting` relation the coupled pairs of polite
  (polite over factual) and of factual (factual over polite) are such twins (a share `strength` of each
  objective's pairs); so are all pairs of concise and detailed. A pair whose two responses have the same
  key (e.g. `unseen`) is no one's twin.
"""

from __future__ import annotations

from typing import Callable

from seqdpo.data import synthetic as S


def _content(x) -> str:
    """A prompt or response, plain text or chat messages, as its text."""
    return x if isinstance(x, str) else "\n".join(f"{m['role']}: {m['content']}" for m in x)


def _text_key(prompt, chosen, rejected) -> tuple:
    return _content(prompt), _content(chosen), _content(rejected)


def _features(response) -> tuple:
    words = _content(response).split()
    return frozenset(a for a, markers in S.ATTRIBUTE_WORDS.items() if set(words) & set(markers)), len(words)


def _synthetic_key(prompt, chosen, rejected) -> tuple:
    (ca, cn), (ra, rn) = _features(chosen), _features(rejected)
    return (cn > rn) - (cn < rn), ca, ra  # the length order, then the attributes of each side


def pair_key(dataset_name: str) -> Callable:
    return _synthetic_key if dataset_name == "synthetic" else _text_key


def _swapped(key: tuple, synthetic: bool) -> tuple:
    return (-key[0], key[2], key[1]) if synthetic else (key[0], key[2], key[1])


def contradictory_pairs(ds, dataset_name: str) -> int:
    """Rows of `ds` (columns prompt, chosen, rejected) whose key, swapped, is another row's key."""
    key, synthetic = pair_key(dataset_name), dataset_name == "synthetic"
    keys = [key(p, c, r) for p, c, r in zip(ds["prompt"], ds["chosen"], ds["rejected"])]
    present = set(keys)
    return sum(_swapped(k, synthetic) != k and _swapped(k, synthetic) in present for k in keys)
