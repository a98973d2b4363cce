"""Measure fastgw's token estimate against tiktoken's exact counts; prints the table of docs/token-estimate.md.

    FASTGW_SKIP_BUILD_CHECK=1 python tests/data/tokens/measure.py

Samples: the *.txt files beside this script (hand-written; samples separated by a line `---`), one class per
file, plus "reference": 3,000-character slices of the Python language reference that ships with CPython
(pydoc_data.topics), English technical prose with code and markup that was NOT used to fit the prices
(only the word-length table came from it).
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CLASSES = ("prose", "code", "cjk", "json", "mixed")
ENCODINGS = ("cl100k_base", "o200k_base")


def load_samples() -> dict[str, list[str]]:
    samples = {}
    for name in CLASSES:
        with open(os.path.join(HERE, name + ".txt"), encoding="utf-8") as f:
            samples[name] = [s.strip("\n") for s in f.read().split("\n---\n") if s.strip()]
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics))
    samples["reference"] = [text[i:i + 3000] for i in range(0, len(text) - 3000, 3000)][::6]
    return samples


def relative_errors(samples: list[str], encoding: str) -> list[float]:
    from fastgw.tokens.estimate import estimate_text_tokens
    from fastgw.tokens.exact import count_text

    out = []
    for s in samples:
        exact = count_text(s, encoding)
        out.append((estimate_text_tokens(s.encode("utf-8"), encoding) - exact) / exact)
    return out


def stats(errors: list[float]) -> tuple[float, float, float]:
    """(mean signed error, mean |error|, p95 |error|)."""
    a = sorted(abs(e) for e in errors)
    p95 = a[min(len(a) - 1, int(round(0.95 * (len(a) - 1))))]
    return sum(errors) / len(errors), sum(a) / len(a), p95


def main() -> None:
    sys.path.insert(0, os.path.abspath(os.path.join(HERE, "..", "..", "..")))
    samples = load_samples()
    print("| class | samples | encoding | mean error | mean abs error | p95 abs error |")
    print("|---|---:|---|---:|---:|---:|")
    for name, group in samples.items():
        for enc in ENCODINGS:
            mean, mae, p95 = stats(relative_errors(group, enc))
            print(f"| {name} | {len(group)} | {enc} | {mean:+.1%} | {mae:.1%} | {p95:.1%} |")


if __name__ == "__main__":
    main()
