"""Built-in corpora, generated offline: names from invented languages, and sentences of a small grammar."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from visionpipe.synthetic import build_atomically

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- names

# Each invented language: onsets, vowels, codas, word endings and a syllable count range.
# They share letters on purpose (so the task is not trivial) but differ in their statistics.
LANGUAGES: dict[str, dict[str, list[str] | tuple[int, int]]] = {
    "aelvish": {"on": ["l", "r", "n", "th", "s", "m", "f", "v", "", "el"], "v": ["a", "e", "i", "ae", "ie", "ia"],
                "co": ["", "", "", "l", "n", "r", "th"], "end": ["iel", "wen", "ion", "as", "ael", "ith"],
                "syl": (1, 3)},
    "dvergar": {"on": ["d", "g", "b", "k", "gr", "br", "dr", "th", "n"], "v": ["o", "u", "a", "oi", "i"],
                "co": ["r", "k", "n", "m", "rn", "rd", "g", "li", ""], "end": ["in", "ur", "ak", "grim", "dur", "ok"],
                "syl": (1, 2)},
    "kotani": {"on": ["k", "s", "sh", "t", "ch", "ts", "n", "m", "y", "r", "h", "f", "w"], "v": ["a", "i", "u", "e", "o"],
               "co": ["", "", "", "", "n"], "end": ["ko", "ro", "mi", "ta", "shi", "ki", "ya"], "syl": (2, 3)},
    "zhulesh": {"on": ["zh", "sh", "ch", "v", "z", "kr", "pr", "str", "sl", "br", "d", "m"], "v": ["a", "o", "e", "i", "y", "u"],
                "co": ["", "", "v", "k", "sk", "n", "sl"], "end": ["ov", "ev", "ska", "enko", "ich", "ava", "slav"],
                "syl": (1, 2)},
    "quetzal": {"on": ["tl", "tz", "x", "qu", "hu", "c", "m", "n", "y", "ch"], "v": ["a", "e", "i", "o"],
                "co": ["", "", "tl", "l", "c", "n", "x"], "end": ["tl", "otl", "atl", "li", "co", "can"],
                "syl": (1, 3)},
    "meridien": {"on": ["b", "c", "d", "l", "m", "p", "r", "s", "v", "gu", "ch"], "v": ["a", "e", "i", "o", "é", "è", "ou", "au"],
                 "co": ["", "", "r", "s", "n", "l"], "end": ["ette", "eau", "ière", "on", "ard", "ès", "ine"],
                 "syl": (1, 2)},
}


def make_name(lang: dict, rng: np.random.Generator) -> str:
    """One name following ``lang``'s phonotactics, capitalized."""
    lo, hi = lang["syl"]
    parts = []
    for _ in range(int(rng.integers(lo, hi + 1))):
        parts += [rng.choice(lang["on"]), rng.choice(lang["v"]), rng.choice(lang["co"])]
    if rng.random() < 0.7:
        parts.append(rng.choice(lang["end"]))
    name = "".join(parts)
    return name[:1].upper() + name[1:]


def names(lang: str, count: int, rng: np.random.Generator, exclude: set[str] = frozenset()) -> list[str]:
    """``count`` distinct names (3–14 characters) of language ``lang`` not in ``exclude``."""
    out: dict[str, None] = {}
    tries = 0
    while len(out) < count:
        tries += 1
        if tries > count * 200:
            raise RuntimeError(f"language {lang}: cannot make {count} distinct names")
        n = make_name(LANGUAGES[lang], rng)
        if 3 <= len(n) <= 14 and n not in exclude:
            out[n] = None
    return list(out)


def generate_names(root: Path, per_class: int, unseen_per_class: int, seed: int) -> None:
    """Write root/<language>.txt (one name per line) and root/unseen/<language>.txt (names not in the former)."""

    def build(tmp: Path) -> None:
        rng = np.random.default_rng(seed)
        for lang in LANGUAGES:
            seen = names(lang, per_class, rng)
            (tmp / f"{lang}.txt").write_text("\n".join(seen) + "\n", encoding="utf-8")
            if unseen_per_class:
                fresh = names(lang, unseen_per_class, rng, exclude=set(seen))
                (tmp / "unseen").mkdir(exist_ok=True)
                (tmp / "unseen" / f"{lang}.txt").write_text("\n".join(fresh) + "\n", encoding="utf-8")

    log.info("generating the built-in names corpus at %s (%d languages x %d names)", root, len(LANGUAGES), per_class)
    build_atomically(root, build)


# ----------------------------------------------------------------------------- grammar text

PEOPLE = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi"]
NOUNS = [("cat", "cats"), ("dog", "dogs"), ("bird", "birds"), ("child", "children"), ("fox", "foxes"),
         ("mouse", "mice"), ("teacher", "teachers"), ("robot", "robots"), ("owl", "owls"), ("farmer", "farmers"),
         ("engine", "engines"), ("apple", "apples"), ("box", "boxes"), ("book", "books"), ("tree", "trees")]
ADJS = ["small", "big", "red", "green", "happy", "quiet", "old", "young", "clever", "lazy", "angry", "empty"]
TRANS = [("sees", "see", "saw"), ("likes", "like", "liked"), ("finds", "find", "found"), ("chases", "chase", "chased"),
         ("follows", "follow", "followed"), ("builds", "build", "built"), ("watches", "watch", "watched"),
         ("carries", "carry", "carried")]
INTRANS = [("sleeps", "sleep", "slept"), ("runs", "run", "ran"), ("sings", "sing", "sang"), ("waits", "wait", "waited"),
           ("jumps", "jump", "jumped"), ("laughs", "laugh", "laughed")]
PREPS = ["near", "under", "behind", "beside", "over", "inside"]
NUMBERS = ["two", "three", "four", "five", "six"]
ADVERBS = ["quickly", "slowly", "quietly", "often", "again"]


def _article(word: str, definite: bool) -> str:
    if definite:
        return "the"
    return "an" if word[0] in "aeiou" else "a"


class _Grammar:
    """A tiny English-like grammar with agreement, articles, questions, quotes and clauses."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng

    def pick(self, seq: list) -> object:
        return seq[int(self.rng.integers(len(seq)))]

    def np_(self) -> tuple[str, bool]:
        """A noun phrase and whether it is plural."""
        r = self.rng.random()
        if r < 0.2:
            return str(self.pick(PEOPLE)), False
        sg, pl = self.pick(NOUNS)
        adj = str(self.pick(ADJS)) + " " if self.rng.random() < 0.45 else ""
        if r < 0.35:
            return f"{self.pick(NUMBERS)} {adj}{pl}", True
        plural = self.rng.random() < 0.35
        head = adj + (pl if plural else sg)
        if plural:
            return ("the " + head) if self.rng.random() < 0.6 else ("some " + head), True
        return f"{_article(head, self.rng.random() < 0.55)} {head}", False

    def vp(self, plural: bool, tense: int) -> str:
        """A verb phrase: tense 0 = present (agreeing), 2 = past."""
        if self.rng.random() < 0.55:
            forms = self.pick(TRANS)
            verb = forms[2] if tense == 2 else forms[1 if plural else 0]
            obj, _ = self.np_()
            out = f"{verb} {obj}"
        else:
            forms = self.pick(INTRANS)
            verb = forms[2] if tense == 2 else forms[1 if plural else 0]
            out = verb
            if self.rng.random() < 0.4:
                out += " " + str(self.pick(ADVERBS))
        if self.rng.random() < 0.3:
            place, _ = self.np_()
            out += f" {self.pick(PREPS)} {place}"
        return out

    def clause(self, tense: int | None = None) -> str:
        subj, plural = self.np_()
        return f"{subj} {self.vp(plural, 0 if tense is None else tense)}"

    def sentence(self) -> str:
        r = self.rng.random()
        if r < 0.4:
            s = self.clause() + " ."
        elif r < 0.55:
            s = "yesterday , " + self.clause(2) + " ."
        elif r < 0.7:
            subj, plural = self.np_()
            forms = self.pick(TRANS + INTRANS)
            obj = " " + self.np_()[0] if forms in TRANS else ""
            s = f"{'do' if plural else 'does'} {subj} {forms[1]}{obj} ?"
        elif r < 0.85:
            s = f"if {self.clause()} , then {self.clause()} ."
        else:
            inner = self.clause()
            s = f'{self.pick(PEOPLE)} said , " {inner[:1].upper() + inner[1:]} . "'
        return s[:1].upper() + s[1:]


def grammar_text(chars: int, rng: np.random.Generator) -> str:
    """Sentences of the grammar, one per line, about ``chars`` characters in all."""
    g, lines, n = _Grammar(rng), [], 0
    while n < chars:
        s = g.sentence()
        lines.append(s)
        n += len(s) + 1
    return "\n".join(lines) + "\n"


PROMPTS = ["The ", "Yesterday , ", "Does the ", "If a ", "Alice said , \" ", "Three "]


def generate_text(root: Path, train_chars: int, val_chars: int, seed: int) -> None:
    """Write root/train.txt, root/val.txt (independent draws of the grammar) and root/prompts.txt."""

    def build(tmp: Path) -> None:
        rng = np.random.default_rng(seed)
        (tmp / "train.txt").write_text(grammar_text(train_chars, rng), encoding="utf-8")
        (tmp / "val.txt").write_text(grammar_text(val_chars, rng), encoding="utf-8")
        (tmp / "prompts.txt").write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")

    log.info("generating the built-in grammar corpus at %s (%d + %d characters)", root, train_chars, val_chars)
    build_atomically(root, build)
