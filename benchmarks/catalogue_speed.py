"""What a catalogue star costs beyond the gate: the imputation of its masked pixels and its OOD score.

    python benchmarks/catalogue_speed.py [--data data/synth] [--rows 1024] [--threads 1] [--maps 112]

On the first ``--rows`` stars of the test split of ``--data`` (noised once, fixed seed), with the folder's
catalogue reference (:mod:`moe.prepare.reference`, built into ``--cache`` if missing) and ``--maps`` map rows
(the experts of 3 labels and PCA1-4: 36 x 3 + 4; random rows, the cost does not depend on their values),
times :meth:`LowRankSpectra.impute` and :meth:`LowRankSpectra.ood_parts` (best of 3) for three kinds of
observation: no pixel masked; 5 % of the pixels of every 50th star masked (``pipeline_scale.py``'s default);
5 % of every star's pixels masked (real PFS spectra: every star has masked pixels). Prints ms per star and the
ratio of each masked case to the unmasked one.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from moe.data.folder import SpectraFolder
from moe.data.shards import find_split, read_block
from moe.prepare.reference import load_or_build


def best_of(fn, repeat: int = 3) -> float:
    """The shortest of ``repeat`` wall times of ``fn()`` after one warm-up call, in seconds."""
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/synth")
    p.add_argument("--cache", default=None, help="folder of the catalogue reference (default: the experts' folder)")
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--maps", type=int, default=112)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    folder = SpectraFolder(args.data)
    spectra = load_or_build(folder, args.cache or Path(args.data) / "experts").spectra
    path = find_split(Path(args.data), "test")[0]
    flux, error = (torch.from_numpy(a) for a in read_block(path, 0, args.rows))
    gen = torch.Generator().manual_seed(0)
    flux = flux + error * torch.randn(flux.shape, generator=gen)
    maps = torch.randn(args.maps, flux.shape[1], generator=gen) * 1e-3
    drop = torch.rand(flux.shape, generator=gen) < 0.05
    every50 = torch.ones_like(drop)
    every50[::50] = ~drop[::50]
    cases = {"none masked": torch.ones_like(drop), "every 50th star 5 %": every50, "every star 5 %": ~drop}
    n = len(flux)
    print(f"{n} test stars of {args.data}, {args.threads} torch thread(s), rank {spectra.rank}, {args.maps} map rows")
    print("| observation | impute ms/star | OOD ms/star | total ms/star | total / unmasked |")
    print("|---|---:|---:|---:|---:|")
    base = None
    for name, usable in cases.items():
        imp = best_of(lambda u=usable: spectra.impute(flux, error, u, 1.0, maps)) / n * 1e3
        ood = best_of(lambda u=usable: spectra.ood_parts(flux, error, u, 1.0)) / n * 1e3
        base = base or imp + ood
        print(f"| {name} | {imp:.3f} | {ood:.3f} | {imp + ood:.3f} | {(imp + ood) / base:.2f} |")


if __name__ == "__main__":
    main()
