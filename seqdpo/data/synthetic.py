"""A synthetic preference world: responses whose attributes are under control, generated from a seed.

Every response is `<topic> : w1 ... wn .`. A response carries two binary attributes; each owns a slot
of `slot` words: `markers` marker words of its vocabulary when it is present, plain words otherwise.
Filler words (as many in chosen as in rejected) are mixed in at random positions, so chosen and
rejected always have the same length:

    polite  (attribute a)  markers please thanks kindly ...     plain you here
    factual (attribute b)  markers correct honest coherent ...  plain some one

Objective `polite` prefers a = 1 over a = 0, objective `factual` prefers b = 1 over b = 0. The option
`relation` sets what the *other* attribute does inside a pair, for both objectives alike; `strength`
is the fraction of pairs where it is coupled (in the other pairs it is equal in chosen and rejected):

    conflicting   chosen lacks the other attribute, rejected has it: polite pairs are (a,b) = (1,0) over
                  (0,1), factual pairs (0,1) over (1,0); at strength 1 factual is polite reversed
    orthogonal    the other attribute is never coupled (strength is ignored)
    compatible    chosen has both attributes, rejected neither: (1,1) over (0,0)

`noise` swaps chosen and rejected in that fraction of pairs (label noise).

Prompts: every training pair asks `tell me about <topic> .`; eval pairs ask through templates no training
pair uses (`EVAL_TEMPLATES`), each (template, topic) at most once per cycle, so up to 80 eval prompts are
distinct and none is a training prompt: what a model does on the eval split (and on generations from its
prompts) is measured on prompts it was not trained on. The eval split of every objective walks the same
seeded order of those prompts.

More objectives, for other studies:
    concise / detailed   filler-only responses, short over long and the reverse (conflict through length)
    unseen               responses of a vocabulary no other objective uses, no preference: its likelihood
                         shifts measure dispersion onto responses outside every training pair

Options (`dataset.options`): relation, strength, noise, markers, slot, seed (the data seed; default:
the run seed). The number of pairs generated per split is `dataset.n_train` / `dataset.n_eval`
(default 256 / 64). docs/synthetic.md explains the choices and what the world reproduces.
"""

from __future__ import annotations

import random
from typing import Any

from seqdpo.data.registry import DataError, DatasetSpec, Objective, register

TOPICS = ["apples", "rivers", "engines", "stars", "bread", "chess", "clouds", "music", "bridges", "tea"]
FILLER = ["it", "is", "a", "thing", "that", "many", "people", "know", "about", "and", "like"]
# Per attribute: many marker words (present) and few plain words (absent, and the rest of the slot).
# Plain words are shared by chosen and rejected, and the rejected has more of them: pushing the
# rejected down drags them, hence the chosen, down too (3D-properties, property 3). Few plain words
# and many markers make that drag outweigh the markers' gain.
ATTRIBUTE_WORDS = {
    "polite": ["please", "thanks", "kindly", "gladly", "glad", "sorry", "help", "careful"],
    "factual": ["correct", "honest", "coherent", "detailed", "concise", "harmless", "example", "answer"],
}
PLAIN_WORDS = {"polite": ["you", "here"], "factual": ["some", "one"]}
# Words of no training pair of the other objectives (every one a single token of the tiny tokenizer).
UNSEEN = ["water", "boils", "degrees", "sea", "poem", "steps", "salt", "flour", "dough", "yeast", "capital", "level"]
TRAIN_TEMPLATE = "tell me about {topic} ."
# Held-out prompts: words that are one token each of the tiny tokenizer where they stand (as the training
# prompt's are) and are no marker, plain or unseen word, so a prompt carries no attribute itself.
EVAL_TEMPLATES = [
    "tell me about the {topic} .",
    "tell me a thing about {topic} .",
    "tell me a simple thing about {topic} .",
    "tell me about {topic} at home .",
    "tell me about {topic} and people .",
    "tell me about {topic} for a short time .",
    "is {topic} a thing that people like ?",
    "is {topic} a thing that many people know about ?",
]
RESPONSE_WORDS = frozenset([*FILLER, *UNSEEN, *(w for d in (ATTRIBUTE_WORDS, PLAIN_WORDS) for ws in d.values() for w in ws)])
ATTRIBUTE_OBJECTIVES = ("polite", "factual")
OBJECTIVES = (*ATTRIBUTE_OBJECTIVES, "concise", "detailed", "unseen")
RELATIONS = ("conflicting", "orthogonal", "compatible")
MAX_SLOT = 12
FILLER_WORDS = (2, 6)  # filler words per response, drawn per pair (chosen and rejected alike)
DEFAULTS: dict[str, Any] = {
    "relation": "conflicting",
    "strength": 1.0,
    "noise": 0.0,
    "markers": 1,
    "slot": 8,
    "seed": None,
}
SIZES = {"n_train": 256, "n_eval": 64}  # pairs per split when dataset.n_train / n_eval are null


def parse_options(options: dict) -> dict[str, Any]:
    """The builder's options with defaults filled in; a `DataError` names any bad key or value."""
    moved = sorted(set(options) & set(SIZES))
    if moved:
        raise DataError(
            f"dataset 'synthetic': option(s) {moved} moved to dataset.n_train / dataset.n_eval "
            f"(e.g. dataset.{moved[0]}={options[moved[0]]}); remove dataset.options.{moved[0]}"
        )
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise DataError(f"dataset 'synthetic': unknown option(s) {unknown}; known: {sorted(DEFAULTS)}")
    opts = {**DEFAULTS, **options}

    def fail(key: str, expected: str):
        raise DataError(f"dataset 'synthetic': option {key}={opts[key]!r} must be {expected}")

    if opts["relation"] not in RELATIONS:
        fail("relation", f"one of {list(RELATIONS)}")
    for key, hi in (("strength", 1.0), ("noise", 0.5)):
        v = opts[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= hi:
            fail(key, f"a number in [0, {hi}]")
        opts[key] = float(v)
    for key, lo in (("markers", 1), ("slot", 2)):
        v = opts[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            fail(key, f"an integer >= {lo}")
    if opts["slot"] > MAX_SLOT:
        fail("slot", f"at most {MAX_SLOT}")
    if opts["markers"] >= opts["slot"]:
        # A slot keeps at least one plain word, so the chosen always shares words with the rejected.
        fail("markers", f"below slot={opts['slot']}")
    if opts["seed"] is not None and (isinstance(opts["seed"], bool) or not isinstance(opts["seed"], int)):
        fail("seed", "an integer or null")
    return opts


def response(rng: random.Random, topic: str, n_filler: int, attributes: dict[str, int], markers: int, slot: int) -> str:
    """Per attribute a slot of `slot` words (`markers` of them markers if it is set, the rest plain),
    plus `n_filler` filler words, in random order."""
    words = [rng.choice(FILLER) for _ in range(n_filler)]
    for a, on in attributes.items():
        n_marker = markers if on else 0
        words += [rng.choice(ATTRIBUTE_WORDS[a]) for _ in range(n_marker)]
        words += [rng.choice(PLAIN_WORDS[a]) for _ in range(slot - n_marker)]
    rng.shuffle(words)
    return f"{topic} : " + " ".join(words) + " ."


def well_formed(text: str) -> bool:
    """Whether `text` has the form of the world's responses, `<topic> : w1 ... wn .` with every w a word
    some response of the world uses (a generation's degeneration guard)."""
    words = text.split()
    return (len(words) >= 4 and words[0] in TOPICS and words[1] == ":" and words[-1] == "."
            and all(w in RESPONSE_WORDS for w in words[2:-1]))


def attribute_pair(objective: str, rng: random.Random, opts: dict) -> tuple[dict, dict, bool]:
    """(chosen attributes, rejected attributes, coupled) for one pair of `polite` or `factual`."""
    other = ATTRIBUTE_OBJECTIVES[1 - ATTRIBUTE_OBJECTIVES.index(objective)]
    coupled = opts["relation"] != "orthogonal" and rng.random() < opts["strength"]
    if coupled:
        c_other, r_other = (1, 0) if opts["relation"] == "compatible" else (0, 1)
    else:
        c_other = r_other = int(rng.random() < 0.5)
    return {objective: 1, other: c_other}, {objective: 0, other: r_other}, coupled


def eval_prompts(n: int, data_seed) -> list[tuple[str, str]]:
    """(prompt text, topic) of eval pairs 0 ... n-1: a seeded order of every (template, topic), repeated
    when n exceeds it. Its own stream, so the eval pairs' responses follow the same draws at any n."""
    combos = [(t.format(topic=topic), topic) for t in EVAL_TEMPLATES for topic in TOPICS]
    random.Random(f"{data_seed}-eval-prompts").shuffle(combos)
    return [combos[i % len(combos)] for i in range(n)]


def _pairs(objective: str, n: int, rng: random.Random, split: str, opts: dict, prompts=None) -> tuple[dict, dict]:
    """`n` pairs of `objective`; `prompts` gives each pair's (prompt text, topic), else the training
    prompt of a topic drawn from `rng`."""
    rows = {"pair_id": [], "prompt": [], "chosen": [], "rejected": []}
    stats = {"rows": n, "coupled": 0, "flipped": 0}
    m, slot = opts["markers"], opts["slot"]
    for i in range(n):
        if prompts is None:
            topic = rng.choice(TOPICS)
            prompt = TRAIN_TEMPLATE.format(topic=topic)
        else:
            prompt, topic = prompts[i]
        n_filler = rng.randint(*FILLER_WORDS)
        if objective in ATTRIBUTE_OBJECTIVES:
            ca, ra, coupled = attribute_pair(objective, rng, opts)
            stats["coupled"] += coupled
            chosen, rejected = response(rng, topic, n_filler, ca, m, slot), response(rng, topic, n_filler, ra, m, slot)
        elif objective == "unseen":
            n_words = n_filler + 2 * slot  # as long as an attribute response
            chosen, rejected = (f"{topic} : " + " ".join(rng.choices(UNSEEN, k=n_words)) + " ." for _ in range(2))
        else:
            short = response(rng, topic, rng.randint(2, 4), {}, m, slot)
            long = response(rng, topic, rng.randint(8, 12), {}, m, slot)
            chosen, rejected = (short, long) if objective == "concise" else (long, short)
        if rng.random() < opts["noise"]:
            chosen, rejected = rejected, chosen
            stats["flipped"] += 1
        rows["pair_id"].append(f"{objective}-{split}-{i}")
        rows["prompt"].append([{"role": "user", "content": prompt}])
        rows["chosen"].append([{"role": "assistant", "content": chosen}])
        rows["rejected"].append([{"role": "assistant", "content": rejected}])
    return rows, stats


DESCRIPTIONS = {
    "polite": "prefers courtesy words (attribute a)",
    "factual": "prefers factual words (attribute b)",
    "concise": "prefers the shorter filler-only response",
    "detailed": "prefers the longer filler-only response",
    "unseen": "no preference; words of no other objective (dispersion probe)",
}


def build(cfg, seed: int) -> dict[str, Objective]:
    from datasets import Dataset

    opts = parse_options(dict(cfg.options))
    data_seed = seed if opts["seed"] is None else opts["seed"]
    n_train = SIZES["n_train"] if cfg.n_train is None else cfg.n_train
    n_eval = SIZES["n_eval"] if cfg.n_eval is None else cfg.n_eval
    out = {}
    prompts = eval_prompts(n_eval, data_seed)
    for name in (o for o in OBJECTIVES if o in cfg.objectives):
        # One stream per objective and split: adding an objective or resizing a split changes no other pair.
        train, st_train = _pairs(name, n_train, random.Random(f"{data_seed}-{name}-train"), "train", opts)
        eval_, st_eval = _pairs(name, n_eval, random.Random(f"{data_seed}-{name}-eval"), "eval", opts, prompts)
        relation = f" ({opts['relation']}, strength {opts['strength']})" if name in ATTRIBUTE_OBJECTIVES else ""
        out[name] = Objective(
            name,
            Dataset.from_dict(train),
            Dataset.from_dict(eval_),
            description=f"synthetic: {DESCRIPTIONS[name]}{relation}",
            stats={"options": {k: v for k, v in opts.items()}, "train": st_train, "eval": st_eval},
        )
    return out


register(
    DatasetSpec(
        name="synthetic",
        build=build,
        objectives=OBJECTIVES,
        hub_id=None,
        revision=None,
        description="Locally generated pairs with controlled attributes and relations (no download).",
    )
)
