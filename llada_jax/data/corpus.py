"""The built-in procedural corpus: deterministic, offline, and learnable by a small model.

No third-party text. Documents mix several generators, each with structure a model can pick up at a few
million parameters: a fixed world of key-value facts (the same country always has the same capital),
templated sentences with agreement, rhyming couplets from a fixed rhyme table, integer arithmetic, and
counting / reversal patterns. Everything is a function of the seed.
"""

from __future__ import annotations

import collections
import math
import random
from typing import Callable, Iterator, Sequence

_NOUNS = ("cat", "dog", "bird", "fox", "horse", "child", "farmer", "sailor", "king", "queen", "robot",
          "teacher", "river", "mountain", "garden", "ship", "lamp", "clock", "baker", "wolf")
_ADJS = ("red", "quiet", "old", "young", "bright", "small", "tall", "green", "happy", "cold", "brave",
         "gentle", "dark", "golden", "tired", "clever")
_VERBS = (("sees", "see"), ("likes", "like"), ("follows", "follow"), ("finds", "find"),
          ("helps", "help"), ("watches", "watch"), ("carries", "carry"), ("paints", "paint"))
_PLACES = ("the forest", "the city", "the sea", "the market", "the hill", "the village", "the school",
           "the harbor", "the castle", "the desert")
_TIMES = ("in the morning", "at night", "every day", "in winter", "after dinner", "before dawn")
_SYLL = ("ka", "lo", "mi", "ra", "ten", "su", "vo", "del", "an", "zi", "por", "ul", "be", "tor", "ni")
_RHYMES = (("night", "light", "bright", "flight", "sight"), ("day", "way", "play", "gray", "stay"),
           ("sea", "free", "tree", "me", "be"), ("rain", "plain", "again", "lane", "chain"),
           ("moon", "soon", "tune", "noon", "june"), ("fire", "higher", "wire", "choir", "tire"))
_LINE_HEADS = ("the wind will carry us into the", "we walk together through the", "she sings softly of the",
               "and all the stars remember the", "my heart is waiting for the", "he dreams alone beneath the",
               "the old road leads us to the", "we laugh and turn toward the")


def _word(rng: random.Random, n: int) -> str:
  return "".join(rng.choice(_SYLL) for _ in range(n))


class World:
  """Fixed facts drawn once from the seed: countries, capitals, colours, ages."""

  def __init__(self, seed: int, num_countries: int = 40, num_people: int = 40):
    rng = random.Random(seed * 7919 + 1)
    self.capitals = {}
    while len(self.capitals) < num_countries:
      self.capitals.setdefault(_word(rng, 2).capitalize() + "ia", _word(rng, 2).capitalize())
    self.people = {}
    while len(self.people) < num_people:
      self.people.setdefault(_word(rng, 2).capitalize(),
                             (rng.choice(_ADJS), rng.choice(_NOUNS), rng.randint(3, 90)))


def _fact(rng: random.Random, w: World) -> str:
  out = []
  for _ in range(rng.randint(2, 5)):
    kind = rng.randrange(3)
    if kind == 0:
      c = rng.choice(sorted(w.capitals))
      out.append(f"the capital of {c} is {w.capitals[c]}.")
    else:
      name = rng.choice(sorted(w.people))
      adj, noun, age = w.people[name]
      out.append(f"{name} is {age} years old." if kind == 1 else f"{name} has a {adj} {noun}.")
  return " ".join(out)


_IRREGULAR = {"child": "children", "fox": "foxes", "wolf": "wolves"}


def _plural(noun: str) -> str:
  return _IRREGULAR.get(noun, noun + "s")


def _sentence(rng: random.Random) -> str:
  out = []
  for _ in range(rng.randint(2, 4)):
    plural = rng.random() < 0.4
    subj = _plural(rng.choice(_NOUNS)) if plural else rng.choice(_NOUNS)
    verb = rng.choice(_VERBS)[1 if plural else 0]
    out.append(f"the {rng.choice(_ADJS)} {subj} {verb} the {rng.choice(_NOUNS)} in {rng.choice(_PLACES)} "
               f"{rng.choice(_TIMES)}.")
  return " ".join(out)


def _couplet(rng: random.Random) -> str:
  group = rng.choice(_RHYMES)
  a, b = rng.sample(group, 2)
  h1, h2 = rng.sample(_LINE_HEADS, 2)
  return f"{h1} {a},\n{h2} {b}."


def _arithmetic(rng: random.Random) -> str:
  out = []
  for _ in range(rng.randint(2, 4)):
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    if rng.random() < 0.5:
      out.append(f"{a} plus {b} is {a + b}.")
    else:
      a, b = max(a, b), min(a, b)
      out.append(f"{a} minus {b} is {a - b}.")
  return " ".join(out)


def _pattern(rng: random.Random) -> str:
  if rng.random() < 0.5:
    start = rng.randint(0, 90)
    n = rng.randint(4, 8)
    return "count: " + " ".join(str(start + i) for i in range(n)) + "."
  words = [rng.choice(_NOUNS) for _ in range(rng.randint(3, 5))]
  return "reverse: " + " ".join(words) + " -> " + " ".join(reversed(words)) + "."


_GENERATORS = ("fact", "sentence", "couplet", "arithmetic", "pattern")


def generate_documents(num_documents: int, seed: int = 0, *, world_seed: int | None = None) -> list[str]:
  """`num_documents` documents, identical for identical arguments. `world_seed` (default `seed`) picks
  the facts; another `seed` with the same world gives held-out documents about the same facts."""
  world = World(seed if world_seed is None else world_seed)
  rng = random.Random(seed)
  docs = []
  for _ in range(num_documents):
    kind = rng.choice(_GENERATORS)
    if kind == "fact":
      docs.append(_fact(rng, world))
    elif kind == "sentence":
      docs.append(_sentence(rng))
    elif kind == "couplet":
      docs.append(_couplet(rng))
    elif kind == "arithmetic":
      docs.append(_arithmetic(rng))
    else:
      docs.append(_pattern(rng))
  return docs


def iter_sentences(docs: list[str]) -> Iterator[str]:
  """Lines of the corpus, for tokenizer training."""
  for doc in docs:
    yield from doc.split("\n")


def sample_prompts() -> list[str]:
  """Prompts for the end-of-training samples: one per generator family."""
  return ["the capital of", "the quiet cat", "12 plus 7 is", "count: 41 42", "we walk together through the"]


def unigram_entropy(docs: Sequence[str], encode: Callable[[str], list[int]], eos_id: int) -> float:
  """Entropy (nats/token) of the corpus's token frequencies, EOS separators included.

  The loss a model reaches by predicting every token from frequencies alone; a model that learned
  anything about context beats it.
  """
  counts = collections.Counter()
  for doc in docs:
    counts.update(encode(doc))
  counts[eos_id] += len(docs)
  total = sum(counts.values())
  return -sum(c / total * math.log(c / total) for c in counts.values())
