"""Commands of the learned hash head: ``hash train|eval|install|remove`` (registered through the
``edge_shitu.commands`` entry point; ``gallery rehash``, which applies a head, is the runtime's).

``hash train`` and ``hash eval`` use :mod:`edge_shitu_converters.hash_training` (numpy only); ``hash install``
puts a head into a bundle (its codes and fingerprint change); ``gallery rehash`` recomputes a
gallery's codes from its stored float embeddings with a bundle's head.

``hash eval`` also scores re-ranked search (``--rerank-n``, ``--compact``, ``--rerank-sweep``: the
Hamming shortlist re-ranked by compact inner products) and, with ``--split-classes --splits K``,
repeats the class split K times and reports means and 95% t intervals of the differences to sign codes.
Its flags are parsed here, not by argparse, so that a bad value is a one-line error (exit 2).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, TextIO, Tuple

from edge_shitu.cli.common import EXIT_OK, Progress
from edge_shitu.errors import InvalidInputError

__all__ = ["register"]

_TRAINING_FLAGS = ("bits", "epochs", "batch_size", "learning_rate", "alpha", "init", "init_scale", "shrinkage",
                   "anchor")


def _dshsd_options(args):
    from edge_shitu_converters.hash_training import DSHSDOptions

    defaults = DSHSDOptions()
    given = {k: getattr(args, k) for k in _TRAINING_FLAGS[1:] if getattr(args, k, None) is not None}
    return DSHSDOptions(bits=args.bits if args.bits is not None else defaults.bits, seed=args.seed, **given)


def _selected_options(args, train, err: TextIO, seed: int):
    """DSHSD options: the flags' (over the defaults), or with ``--select`` the best of the selection grid
    on validation splits of ``train``'s classes (the flags then set the fields the grid does not vary);
    ``seed`` seeds training (and the selection's splits)."""
    from edge_shitu_converters import hash_training as ht

    opts = replace(_dshsd_options(args), seed=seed)
    if not args.select:
        return opts
    grid = ht.selection_grid(opts)
    err.write(f"selecting DSHSD hyper-parameters: {len(grid)} candidates x {args.select_folds} class splits of the "
              f"{len(train.names)} training classes (validation mAP)\n")
    done = []
    with Progress("selecting", len(grid), err) as progress:
        def step(options, r1, ap):
            done.append(ap)
            progress.update(len(done))

        selection = ht.select_dshsd(train, grid, folds=args.select_folds, seed=seed, on_result=step)
    best = next(row for row in selection.table if row[0] == selection.best)
    err.write(f"selected: init {best[0].init} (shrinkage {best[0].shrinkage}), init_scale {best[0].init_scale}, "
              f"learning_rate {best[0].learning_rate}, epochs {best[0].epochs}, anchor {best[0].anchor} "
              f"(validation recall@1 {best[1]:.4f}, mAP {best[2]:.4f})\n")
    return selection.best


def _itq_options(args, seed: int):
    from edge_shitu_converters.hash_training import ITQOptions

    return ITQOptions(bits=args.bits if args.bits is not None else ITQOptions().bits, seed=seed)


def _cmd_hash_train(args, out: TextIO, err: TextIO) -> int:
    from edge_shitu_converters import hash_training as ht

    data = ht.load_embeddings(args.embeddings)
    if args.method == "itq":
        result = ht.train_itq(data, _itq_options(args, args.seed))
    else:
        result = ht.train_dshsd(data, _selected_options(args, data, err, args.seed))
    from edge_shitu_converters.hash_heads import head_sha256, save_head

    path = save_head(result.head, args.out)
    record = {"head": str(path), "sha256": head_sha256(result.head), "method": result.method,
              "bits": result.head.bits, "dim": result.head.dim, "items": len(data), "classes": len(data.names),
              "seconds": round(result.seconds, 3), "options": result.info}
    if args.json:
        json.dump(record, out, indent=2)
        out.write("\n")
    else:
        out.write(f"{result.method} head [{result.head.bits}, {result.head.dim}] trained on {len(data)} items of "
                  f"{len(data.names)} classes in {result.seconds:.1f} s -> {path} "
                  f"(sha256 {record['sha256'][:16]}...)\n")
    return EXIT_OK


def _num(v: float):
    return None if v != v else v  # NaN (no answerable query) is not JSON


def _score_record(scores) -> Dict:
    return {"recall_at_1": _num(scores.recall_at_1), "map": _num(scores.mean_ap), "queries": scores.queries,
            "items": scores.items}


def _int_flag(flag: str, text: str, low: int) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        value = None
    if value is None or value < low:
        raise InvalidInputError(f"{flag} must be an integer >= {low}, got {text!r}")
    return value


def _eval_flags(args) -> Tuple[int, str, Tuple[int, ...], int]:
    """``(rerank_n, compact, sweep, splits)`` from the flags, each checked (one-line errors, exit 2)."""
    from edge_shitu.compact import COMPACT_FORMATS

    rerank_n = _int_flag("--rerank-n", args.rerank_n, 0)
    if args.compact not in COMPACT_FORMATS:
        raise InvalidInputError(f"--compact must be one of {', '.join(COMPACT_FORMATS)}, got {args.compact!r}")
    sweep: Tuple[int, ...] = ()
    if args.rerank_sweep is not None:
        sweep = tuple(_int_flag("--rerank-sweep", part.strip(), 1) for part in args.rerank_sweep.split(","))
        if len(set(sweep)) != len(sweep):
            raise InvalidInputError(f"--rerank-sweep repeats a value: {args.rerank_sweep!r}")
    splits = _int_flag("--splits", args.splits, 1)
    if splits > 1 and not args.split_classes:
        raise InvalidInputError("--splits only applies with --split-classes")
    if splits > 1 and sweep:
        raise InvalidInputError("--rerank-sweep needs a single split: drop --splits or --rerank-sweep")
    return rerank_n, args.compact, sweep, splits


def _rerank_record(n: int, compact: str, bytes_per_item: int, codes: str, scores) -> Dict:
    return {"n": n, "compact": compact, "bytes_per_item": bytes_per_item, **_score_record(scores), "codes": codes}


def _evaluate(data, heads: Dict, given, *, rerank_n: int, compact: str, sweep: Sequence[int]):
    """Scores of float, sign, the heads and re-ranked search on ``data``.

    Returns ``(scores, reranks, sweep_rows)``: name -> RetrievalScores (float, sign, heads, then
    "rerank" and "rerank_head" when asked), name -> rerank record, and the sweep's rerank records."""
    from edge_shitu.codes import binarize
    from edge_shitu.compact import compress
    from edge_shitu_converters import hash_training as ht

    scores = ht.compare_heads(data, heads)
    reranks: Dict[str, Dict] = {}
    rows: List[Dict] = []
    if not rerank_n and not sweep:
        return scores, reranks, rows
    vectors = compress(data.embeddings, compact)
    sources = [("rerank", "sign", binarize(data.embeddings))]
    if given is not None:
        sources.append(("rerank_head", "head", given.encode(data.embeddings)))
    for name, label, codes in sources:
        if rerank_n:
            scores[name] = ht.leave_one_out_reranked(data, codes=codes, vectors=vectors, shortlist=rerank_n)
            reranks[name] = _rerank_record(rerank_n, compact, vectors.bytes_per_item, label, scores[name])
        for n in sweep:
            got = ht.leave_one_out_reranked(data, codes=codes, vectors=vectors, shortlist=n)
            rows.append(_rerank_record(n, compact, vectors.bytes_per_item, label, got))
    return scores, reranks, rows


def _row_name(name: str, reranks: Dict) -> str:
    return f"{name}-{reranks[name]['n']}" if name in reranks else name


def _write_sweep(out: TextIO, rows: Sequence[Dict]) -> None:
    if not rows:
        return
    out.write(f"re-ranked shortlists: Hamming top-N re-ranked by {rows[0]['compact']} inner product "
              f"({rows[0]['bytes_per_item']} bytes per item), the rest in Hamming order\n")
    out.write(f"{'codes':<6} {'N':>5} {'recall@1':>9} {'mAP':>8} {'queries':>8}\n")
    for r in rows:
        r1 = float("nan") if r["recall_at_1"] is None else r["recall_at_1"]
        ap = float("nan") if r["map"] is None else r["map"]
        out.write(f"{r['codes']:<6} {r['n']:>5} {r1:>9.4f} {ap:>8.4f} {r['queries']:>8}\n")


def _cmd_hash_eval(args, out: TextIO, err: TextIO) -> int:
    from edge_shitu_converters import hash_training as ht
    from edge_shitu.hashing import HashHead

    rerank_n, compact, sweep, n_splits = _eval_flags(args)
    if not args.split_classes:
        unused = [f"--{k.replace('_', '-')}" for k in _TRAINING_FLAGS if getattr(args, k) is not None]
        if args.select:
            unused.append("--select")
        if unused:
            raise InvalidInputError(f"{', '.join(unused)} only apply with --split-classes "
                                    "(heads are trained only then)")
    data = ht.load_embeddings(args.embeddings)
    given = HashHead.load(args.head) if args.head else None
    knobs = {"rerank_n": rerank_n, "compact": compact, "sweep": sweep}
    if not args.split_classes:
        scores, reranks, rows = _evaluate(data, {"head": given} if given is not None else {}, given, **knobs)
        runs = [{"seed": None, "split": None, "scores": scores, "reranks": reranks, "sweep": rows, "seconds": {},
                 "title": f"all items: {len(data.names)} classes, {len(data)} items"}]
    else:
        if given is not None:
            err.write(f"note: {args.head} is scored on the held-out classes as given: those classes are unseen by "
                      "it only if it was trained without them\n")
        runs = []
        for seed in range(args.seed, args.seed + n_splits):
            runs.append(_split_run(args, data, given, seed, knobs, err))
            if n_splits > 1:
                secs = runs[-1]["seconds"]
                err.write(f"split {len(runs)}/{n_splits} (seed {seed}): trained itq in {secs['itq']:.1f} s, "
                          f"dshsd in {secs['dshsd']:.1f} s\n")
    if n_splits > 1:
        return _write_splits(args, runs, out)
    run = runs[0]
    scores, reranks, seconds = run["scores"], run["reranks"], run["seconds"]
    summary = _split_summary(runs) if args.split_classes else None
    if args.json:
        record = {"embeddings": str(args.embeddings), "split": run["split"],
                  "results": {k: reranks[k] if k in reranks else _score_record(v) for k, v in scores.items()},
                  "training_seconds": {k: round(v, 3) for k, v in seconds.items()}}
        if run["sweep"]:
            record["rerank_sweep"] = run["sweep"]
        if summary is not None:
            record.update(_splits_json(args, runs, summary))
        json.dump(record, out, indent=2)
        out.write("\n")
        return EXIT_OK
    out.write(f"leave-one-out retrieval, {run['title']}\n")
    out.write(f"{'method':<16} {'recall@1':>9} {'mAP':>8} {'queries':>8} {'train s':>8}\n")
    for name, s in scores.items():
        t = f"{seconds[name]:.1f}" if name in seconds else "-"
        out.write(f"{_row_name(name, reranks):<16} {s.recall_at_1:>9.4f} {s.mean_ap:>8.4f} {s.queries:>8} {t:>8}\n")
    out.write("ties are broken by ascending item index; queries whose label has no other item are left out\n")
    if reranks:
        some = next(iter(reranks.values()))
        out.write(f"rerank-N: the Hamming top {some['n']} re-ranked by {some['compact']} inner product with the "
                  f"query's float feature ({some['bytes_per_item']} bytes per item), then the rest in Hamming order\n")
    _write_sweep(out, run["sweep"])
    if summary is not None:
        out.write("difference to sign codes: no 95% interval with one split (use --splits K, K >= 2)\n")
    return EXIT_OK


def _split_run(args, data, given, seed: int, knobs: Dict, err: TextIO) -> Dict:
    """Train ITQ and DSHSD on one class split's training classes, score everything on its held-out ones."""
    from edge_shitu_converters import hash_training as ht

    train_idx, test_idx = ht.split_classes(data.classes, train_fraction=args.train_fraction, seed=seed)
    train, test = data.subset(train_idx), data.subset(test_idx)
    options = _selected_options(args, train, err, seed)
    heads, seconds = {}, {}
    for name, fit in (("itq", lambda: ht.train_itq(train, _itq_options(args, seed))),
                      ("dshsd", lambda: ht.train_dshsd(train, options))):
        result = fit()
        heads[name], seconds[name] = result.head, result.seconds
    if given is not None:
        heads["head"] = given
    scores, reranks, rows = _evaluate(test, heads, given, **knobs)
    split = {"seed": seed, "train_fraction": args.train_fraction,
             "train": {"classes": len(train.names), "items": len(train)},
             "test": {"classes": len(test.names), "items": len(test)}}
    title = (f"held-out classes: {len(test.names)} classes, {len(test)} items (trained on the other "
             f"{len(train.names)} classes, {len(train)} items; split seed {seed}, "
             f"train fraction {args.train_fraction})")
    return {"seed": seed, "split": split, "scores": scores, "reranks": reranks, "sweep": rows, "seconds": seconds,
            "title": title}


def _split_summary(runs: Sequence[Dict]) -> Tuple[Dict, Dict]:
    """Per method the means over splits, and each method's paired difference to sign codes."""
    from edge_shitu_converters import hash_training as ht

    methods = list(runs[0]["scores"])
    means, diffs = {}, {}
    for m in methods:
        r1 = [run["scores"][m].recall_at_1 for run in runs]
        ap = [run["scores"][m].mean_ap for run in runs]
        means[m] = (float(sum(r1) / len(r1)), float(sum(ap) / len(ap)), r1, ap)
        if m != "sign":
            diffs[m] = (ht.paired_difference(r1, [run["scores"]["sign"].recall_at_1 for run in runs]),
                        ht.paired_difference(ap, [run["scores"]["sign"].mean_ap for run in runs]))
    return means, diffs


def _ci(ci: Optional[Tuple[float, float]]):
    return None if ci is None else [_num(ci[0]), _num(ci[1])]


def _splits_json(args, runs: Sequence[Dict], summary: Tuple[Dict, Dict]) -> Dict:
    means, diffs = summary
    splits = [{"seed": run["seed"], "train": run["split"]["train"], "test": run["split"]["test"],
               "results": {k: run["reranks"][k] if k in run["reranks"] else _score_record(v)
                           for k, v in run["scores"].items()},
               "training_seconds": {k: round(v, 3) for k, v in run["seconds"].items()}} for run in runs]
    summary_json = {m: {"recall_at_1_mean": _num(r1), "map_mean": _num(ap), "recall_at_1": [_num(v) for v in r1s],
                        "map": [_num(v) for v in aps]} for m, (r1, ap, r1s, aps) in means.items()}
    vs = {m: {"recall_at_1_diff_mean": _num(d.mean), "ci95": _ci(d.ci95), "splits": len(runs),
              "recall_at_1_diffs": [_num(v) for v in d.diffs], "map_diff_mean": _num(a.mean),
              "map_ci95": _ci(a.ci95), "map_diffs": [_num(v) for v in a.diffs]}
          for m, (d, a) in diffs.items()}
    return {"train_fraction": args.train_fraction, "splits": splits, "summary": summary_json, "vs_sign": vs}


def _verdict(diff) -> str:
    if diff.ci95 is None:
        return "no interval"
    if not diff.excludes_zero:
        return "interval includes zero: no clear difference from sign codes"
    return f"interval excludes zero: {'better' if diff.mean > 0 else 'worse'} than sign codes"


def _write_splits(args, runs: Sequence[Dict], out: TextIO) -> int:
    summary = _split_summary(runs)
    if args.json:
        record = {"embeddings": str(args.embeddings), **_splits_json(args, runs, summary)}
        json.dump(record, out, indent=2)
        out.write("\n")
        return EXIT_OK
    means, diffs = summary
    k, reranks = len(runs), runs[0]["reranks"]
    out.write(f"leave-one-out retrieval on held-out classes, {k} class splits (seeds {runs[0]['seed']}.."
              f"{runs[-1]['seed']}, train fraction {args.train_fraction}); heads trained on each split's other "
              "classes\n")
    out.write(f"{'method':<16} {'recall@1':>9} {'mAP':>8}   recall@1 per split\n")
    for m, (r1, ap, r1s, _) in means.items():
        per = " ".join(f"{v:.4f}" for v in r1s)
        out.write(f"{_row_name(m, reranks):<16} {r1:>9.4f} {ap:>8.4f}   {per}\n")
    out.write(f"difference to sign codes, mean over the {k} splits with the 95% t interval of the {k} paired "
              "per-split differences:\n")
    out.write(f"{'method':<16} {'recall@1 diff':>14} {'95% interval':>20} {'mAP diff':>9} {'95% interval':>20}\n")
    for m, (d, a) in diffs.items():
        cis = ["-" if c.ci95 is None else f"[{c.ci95[0]:+.4f}, {c.ci95[1]:+.4f}]" for c in (d, a)]
        out.write(f"{_row_name(m, reranks):<16} {d.mean:>+14.4f} {cis[0]:>20} {a.mean:>+9.4f} {cis[1]:>20}\n")
    for m, (d, a) in diffs.items():
        out.write(f"{_row_name(m, reranks)}: recall@1 {_verdict(d)}; mAP {_verdict(a)}\n")
    return EXIT_OK


def _cmd_hash_install(args, out: TextIO, err: TextIO) -> int:
    from edge_shitu.bundle import Bundle
    from edge_shitu_converters.hash_heads import install_head

    path = install_head(args.bundle, args.head, source={"installed_from": Path(args.head).name})
    bundle = Bundle.load(args.bundle)
    out.write(f"hash head installed: {path} ({bundle.codes.bits}-bit codes); bundle fingerprint is now "
              f"{bundle.code_fingerprint}: re-hash its galleries with `edge-shitu gallery rehash G --bundle "
              f"{args.bundle}` (needs stored embeddings) or rebuild them\n")
    return EXIT_OK


def _cmd_hash_remove(args, out: TextIO, err: TextIO) -> int:
    from edge_shitu.bundle import Bundle
    from edge_shitu_converters.hash_heads import remove_head

    if remove_head(args.bundle):
        out.write(f"hash head removed: {args.bundle} makes plain sign codes again (fingerprint "
                  f"{Bundle.load(args.bundle).code_fingerprint})\n")
    else:
        out.write(f"{args.bundle} has no hash head: nothing to do\n")
    return EXIT_OK


def _training_flags(p) -> None:
    p.add_argument("--bits", type=int, default=None, help="code length (default 512)")
    p.add_argument("--seed", type=int, default=0, help="seed of training (and of the class split)")
    p.add_argument("--epochs", type=int, default=None, help="dshsd: passes over the data")
    p.add_argument("--batch-size", type=int, default=None, help="dshsd: items per minibatch")
    p.add_argument("--learning-rate", "--lr", dest="learning_rate", type=float, default=None,
                   help="dshsd: Adam step size of the hash layer")
    p.add_argument("--alpha", type=float, default=None, help="dshsd: weight of the pairwise term (0.05)")
    p.add_argument("--init", choices=["identity", "whitening", "itq", "orthogonal"], default=None,
                   help="dshsd: start of the hash layer (identity = plain sign)")
    p.add_argument("--init-scale", type=float, default=None, help="dshsd: RMS of the start's outputs")
    p.add_argument("--shrinkage", type=float, default=None, help="dshsd --init whitening: covariance shrinkage")
    p.add_argument("--anchor", type=float, default=None, help="dshsd: pull towards the start (0 = none)")
    p.add_argument("--select", action="store_true",
                   help="dshsd: choose start, scale, learning rate, epochs and anchor on class splits of the "
                        "training data (validation mAP; takes minutes)")
    p.add_argument("--select-folds", type=int, default=4, help="--select: number of class splits")


def register(subparsers, groups) -> None:
    """Attach ``hash`` (train, eval, install, remove) to the ``edge-shitu`` parser."""
    h = subparsers.add_parser("hash", help="learned hash heads (DSHSD, ITQ)").add_subparsers(
        dest="hash_cmd", metavar="ACTION", required=True)

    ht = h.add_parser("train", help="train a hash head on labelled embeddings")
    ht.add_argument("--embeddings", required=True, help="npz with embeddings float32 [n, d] and labels [n]")
    ht.add_argument("--out", required=True, help="head file to write (npz: weight [bits, d], bias [bits])")
    ht.add_argument("--method", choices=["dshsd", "itq"], default="dshsd",
                    help="dshsd: supervised (uses the labels); itq: unsupervised rotation (default dshsd)")
    _training_flags(ht)
    ht.add_argument("--json", action="store_true", help="print the result as one JSON object")
    ht.set_defaults(func=_cmd_hash_train)

    he = h.add_parser("eval", help="leave-one-out recall@1 and mAP: float inner product, sign, heads")
    he.add_argument("--embeddings", required=True, help="npz with embeddings float32 [n, d] and labels [n]")
    he.add_argument("--head", help="a head file to evaluate as well")
    he.add_argument("--split-classes", action="store_true",
                    help="train ITQ and DSHSD on part of the classes, evaluate on the others")
    he.add_argument("--train-fraction", type=float, default=0.5, help="share of the classes to train on")
    he.add_argument("--splits", default="1", metavar="K",
                    help="--split-classes: K class splits (seeds seed..seed+K-1), means and 95%% intervals of the "
                         "differences to sign codes (default 1)")
    he.add_argument("--rerank-n", default="16", metavar="N",
                    help="also score the Hamming top N re-ranked by compact inner product (default 16; 0 = off)")
    he.add_argument("--compact", default="int8", metavar="FMT",
                    help="stored form of the features used to re-rank: int8 (d + 4 bytes) or fp16 (2 d bytes)")
    he.add_argument("--rerank-sweep", default=None, metavar="N,N,...",
                    help="also score re-ranking for each of these shortlist sizes (e.g. 2,3,5,8,16,32)")
    _training_flags(he)
    he.add_argument("--json", action="store_true", help="print the scores as one JSON object")
    he.set_defaults(func=_cmd_hash_eval)

    hi = h.add_parser("install", help="put a hash head into a bundle (changes its codes and fingerprint)")
    hi.add_argument("head", help="head file (npz)")
    hi.add_argument("--bundle", required=True, help="the bundle folder to put the head into")
    hi.set_defaults(func=_cmd_hash_install)

    hr = h.add_parser("remove", help="take the hash head out of a bundle (plain sign codes again)")
    hr.add_argument("--bundle", required=True, help="the bundle folder to take the head out of")
    hr.set_defaults(func=_cmd_hash_remove)
