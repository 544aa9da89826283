"""Quality against time from a run of `lssgen eval-generation` (issue #27): one point per setting, coloured by
method, the Pareto front (no other setting is at least as fast and at least as good, one of them strictly) joined
and its points named.

    python -m scripts.pareto_plot outputs/methods-256 --quality overall --out docs/methods-256.png
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from PIL import Image, ImageDraw

from lssgen.methods import resolve_method

# Colours by the method a setting's name starts with (eval-generation names rows "stock ...", "lssgen ...", or by
# a method's spelling).
COLOURS = {
    "stock": (90, 90, 90),
    "lssgen": (31, 119, 180),
    "refine": (214, 39, 40),
    "spectral": (44, 160, 44),
    "bottleneck": (148, 103, 189),
}
QUALITIES = {
    "overall": "GenEval-style accuracy (overall)",
    "exact": "share of images with exactly the prompt's objects",
}


def quality_of(score: dict, quality: str) -> float:
    return score["accuracy"]["overall"] if quality == "overall" else score[quality]


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points `(time, quality)` no other point dominates (as fast or faster and as good or better,
    one of them strictly), fastest first."""
    front = [
        i
        for i, (time, quality) in enumerate(points)
        if not any(
            t <= time and q >= quality and (t < time or q > quality) for j, (t, q) in enumerate(points) if j != i
        )
    ]
    return sorted(front, key=lambda i: points[i])


def label(name: str) -> str:
    """A setting's name for the plot: a method's spelling with only the parameters that differ from its defaults (a
    latent spectrum left out), e.g. `bottleneck:steps=4/12/6`."""
    try:
        method = resolve_method(name)
    except (ValueError, TypeError):
        return name  # "stock ...", "lssgen ..."
    default = type(method)()
    changed = [
        f"{f.name}={'/'.join(map(str, value)) if isinstance(value, tuple) else value}"
        for f in dataclasses.fields(method)
        if (value := getattr(method, f.name)) != getattr(default, f.name) and f.name not in ("a", "beta")
    ]
    return method.name + (":" + ",".join(changed) if changed else " (defaults)")


def method_of(name: str) -> str:
    return next((method for method in COLOURS if name.startswith(method)), "stock")


def pareto_plot(report: dict, quality: str = "overall", size: tuple[int, int] = (900, 560)) -> Image.Image:
    scores = report["scores"]
    points = [(score["time_ratio"], quality_of(score, quality)) for score in scores]
    front = pareto_front(points)
    width, height = size
    left, right, top, bottom = 70, 250, 30, 60
    times = [t for t, _ in points]
    values = [q for _, q in points]
    t_low, t_high = 0.0, max(1.05, max(times) * 1.05)
    q_low, q_high = max(0.0, min(values) - 0.05), min(1.0, max(values) + 0.05)

    def at(t: float, q: float) -> tuple[float, float]:
        x = left + (t - t_low) / (t_high - t_low) * (width - left - right)
        y = height - bottom - (q - q_low) / (q_high - q_low) * (height - top - bottom)
        return x, y

    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for i in range(6):
        t = t_low + (t_high - t_low) * i / 5
        x, _ = at(t, q_low)
        draw.line([x, height - bottom, x, height - bottom + 4], fill="black")
        draw.text((x - 12, height - bottom + 8), f"{t:.2f}", fill="black")
        q = q_low + (q_high - q_low) * i / 5
        _, y = at(t_low, q)
        draw.line([left - 4, y, left, y], fill="black")
        draw.text((left - 40, y - 6), f"{q:.2f}", fill="black")
    draw.text(
        (left + 120, height - 24), "time per image, relative to the stock setting (lower is faster)", fill="black"
    )
    draw.text((left, 8), f"{QUALITIES[quality]} against time, one point per setting", fill="black")
    if len(front) > 1:
        draw.line([at(*points[i]) for i in front], fill=(255, 160, 0), width=3)
    for index, (score, point) in enumerate(zip(scores, points)):
        x, y = at(*point)
        colour = COLOURS[method_of(score["name"])]
        radius = 6 if index in front else 4
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour, outline="black")
    # The front's settings, named in the margin in the order of the line.
    draw.text((width - right + 10, top), "Pareto front:", fill=(200, 120, 0))
    for rank, index in enumerate(front):
        draw.text((width - right + 10, top + 16 * (rank + 1)), label(scores[index]["name"]), fill="black")
    legend = top + 16 * (len(front) + 2)
    for rank, (method, colour) in enumerate(COLOURS.items()):
        y = legend + 16 * rank
        draw.ellipse([width - right + 10, y + 2, width - right + 20, y + 12], fill=colour, outline="black")
        draw.text((width - right + 26, y), method, fill="black")
    return image


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="an eval-generation output folder (its report.json)")
    parser.add_argument("--quality", choices=sorted(QUALITIES), default="overall")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    report = json.loads((args.run_dir / "report.json").read_text())
    pareto_plot(report, args.quality).save(args.out)
    names = [label(report["scores"][i]["name"]) for i in pareto_front(
        [(s["time_ratio"], quality_of(s, args.quality)) for s in report["scores"]]
    )]  # fmt: skip
    print(f"wrote {args.out}; Pareto front: {names}")


if __name__ == "__main__":
    main()
