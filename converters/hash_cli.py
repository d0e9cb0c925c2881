"""Commands of the learned hash head: ``hash train|eval|install|remove`` (registered through the
``edge_shitu.commands`` entry point; ``gallery rehash``, which applies a head, is the runtime's).

``hash train`` and ``hash eval`` use :mod:`edge_shitu_converters.hash_training` (numpy only); ``hash install``
puts a head into a bundle (its codes and fingerprint change); ``gallery rehash`` recomputes a
gallery's codes from its stored float embeddings with a bundle's head.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, TextIO

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


def _selected_options(args, train, err: TextIO):
    """DSHSD options: the flags' (over the defaults), or with ``--select`` the best of the selection grid
    on validation splits of ``train``'s classes (the flags then set the fields the grid does not vary)."""
    from edge_shitu_converters import hash_training as ht

    opts = _dshsd_options(args)
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

        selection = ht.select_dshsd(train, grid, folds=args.select_folds, seed=args.seed, on_result=step)
    best = next(row for row in selection.table if row[0] == selection.best)
    err.write(f"selected: init {best[0].init} (shrinkage {best[0].shrinkage}), init_scale {best[0].init_scale}, "
              f"learning_rate {best[0].learning_rate}, epochs {best[0].epochs}, anchor {best[0].anchor} "
              f"(validation recall@1 {best[1]:.4f}, mAP {best[2]:.4f})\n")
    return selection.best


def _itq_options(args):
    from edge_shitu_converters.hash_training import ITQOptions

    return ITQOptions(bits=args.bits if args.bits is not None else ITQOptions().bits, seed=args.seed)


def _cmd_hash_train(args, out: TextIO, err: TextIO) -> int:
    from edge_shitu_converters import hash_training as ht

    data = ht.load_embeddings(args.embeddings)
    if args.method == "itq":
        result = ht.train_itq(data, _itq_options(args))
    else:
        result = ht.train_dshsd(data, _selected_options(args, data, err))
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


def _score_record(scores) -> Dict:
    def num(v: float):
        return None if v != v else v  # NaN (no answerable query) is not JSON

    return {"recall_at_1": num(scores.recall_at_1), "map": num(scores.mean_ap), "queries": scores.queries,
            "items": scores.items}


def _cmd_hash_eval(args, out: TextIO, err: TextIO) -> int:
    from edge_shitu_converters import hash_training as ht
    from edge_shitu.hashing import HashHead

    if not args.split_classes:
        unused = [f"--{k.replace('_', '-')}" for k in _TRAINING_FLAGS if getattr(args, k) is not None]
        if args.select:
            unused.append("--select")
        if unused:
            raise InvalidInputError(f"{', '.join(unused)} only apply with --split-classes "
                                    "(heads are trained only then)")
    data = ht.load_embeddings(args.embeddings)
    given = HashHead.load(args.head) if args.head else None
    seconds: Dict[str, float] = {}
    if args.split_classes:
        train_idx, test_idx = ht.split_classes(data.classes, train_fraction=args.train_fraction, seed=args.seed)
        train, test = data.subset(train_idx), data.subset(test_idx)
        heads = {}
        options = _selected_options(args, train, err)
        for name, fit in (("itq", lambda: ht.train_itq(train, _itq_options(args))),
                          ("dshsd", lambda: ht.train_dshsd(train, options))):
            result = fit()
            heads[name], seconds[name] = result.head, result.seconds
        if given is not None:
            heads["head"] = given
            err.write(f"note: {args.head} is scored on the held-out classes as given: those classes are unseen by "
                      "it only if it was trained without them\n")
        scores = ht.compare_heads(test, heads)
        split = {"seed": args.seed, "train_fraction": args.train_fraction,
                 "train": {"classes": len(train.names), "items": len(train)},
                 "test": {"classes": len(test.names), "items": len(test)}}
        title = (f"held-out classes: {len(test.names)} classes, {len(test)} items (trained on the other "
                 f"{len(train.names)} classes, {len(train)} items; split seed {args.seed}, "
                 f"train fraction {args.train_fraction})")
    else:
        scores = ht.compare_heads(data, {"head": given} if given is not None else {})
        split = None
        title = f"all items: {len(data.names)} classes, {len(data)} items"
    if args.json:
        json.dump({"embeddings": str(args.embeddings), "split": split,
                   "results": {k: _score_record(v) for k, v in scores.items()},
                   "training_seconds": {k: round(v, 3) for k, v in seconds.items()}}, out, indent=2)
        out.write("\n")
        return EXIT_OK
    out.write(f"leave-one-out retrieval, {title}\n")
    out.write(f"{'method':<10} {'recall@1':>9} {'mAP':>8} {'queries':>8} {'train s':>8}\n")
    for name, s in scores.items():
        t = f"{seconds[name]:.1f}" if name in seconds else "-"
        out.write(f"{name:<10} {s.recall_at_1:>9.4f} {s.mean_ap:>8.4f} {s.queries:>8} {t:>8}\n")
    out.write("ties are broken by ascending item index; queries whose label has no other item are left out\n")
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
