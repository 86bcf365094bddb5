"""The `scan-deploy` command line. Heavy packages (torch) are imported inside the commands that
need them, so commands of the runtime work on a device without torch."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from scan_deploy import __version__, choices
from scan_deploy.errors import UserError
from scan_deploy.extras import missing_extra


class CommandGroup(TyperGroup):
    """Commands that need a module of an extra which is not installed say, in one line, which
    extra to install (`scan_deploy.extras`) instead of raising ModuleNotFoundError."""

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ModuleNotFoundError as exc:
            error = missing_extra(exc, f"{ctx.command_path} {ctx.invoked_subcommand}")
            if error is None:
                raise
            raise error from None


app = typer.Typer(
    cls=CommandGroup,
    help="SCAN image-text matching: train, evaluate, export and deploy.",
    invoke_without_command=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(
    cls=CommandGroup, help="Data sets in the SCAN precomp format.", invoke_without_command=True
)
app.add_typer(data_app, name="data")
# Tables are wider than the 80 columns rich assumes when output is piped (CI logs, `| tee`).
console = Console(width=None if sys.stdout.isatty() else 120)
err_console = Console(stderr=True)


# Options several commands share, declared once.
RayAddress = Annotated[
    str | None,
    typer.Option(help="The Ray cluster to join, 'auto' or HOST:PORT (default: a local instance)."),
]
Threads = Annotated[int, typer.Option(help="ONNX Runtime (and FAISS) threads (0: default).")]
Backend = Annotated[choices.Backend, typer.Option(help="Inference backend.")]
GraphPrecision = Annotated[choices.Precision, typer.Option(help="Precision of the graphs.")]
TorchCheckpoint = Annotated[Path | None, typer.Option(help="Checkpoint, for --backend torch only.")]
GalleryBundle = Annotated[
    Path | None, typer.Option(help="Bundle (default: the one the gallery was indexed with).")
]
Shortlist = Annotated[
    int | None, typer.Option(help="Re-rank only the N candidates of the first stage.")
]
ShortlistEngine = Annotated[
    choices.ShortlistEngine,
    typer.Option(help="The global stage on auto (its FAISS index if installed), numpy or faiss."),
]
FirstStage = Annotated[
    choices.FirstStage | None,
    typer.Option(help="What picks the shortlist (default: maxsim if indexed, else global)."),
]
FaissParams = Annotated[
    str | None,
    typer.Option(help="FAISS search parameters, e.g. nprobe=64 (default: recorded by index)."),
]
TokenCandidates = Annotated[
    int | None,
    typer.Option(min=1, help="maxsim: gallery tokens per query token (default: the shortlist)."),
]
ExactScorer = Annotated[
    choices.Scorer,
    typer.Option(
        "--scorer",
        help="Exact scorer: auto (int8 on an int8 gallery where it can run), float or int8.",
    ),
]
DataVocab = Annotated[
    Path | None,
    typer.Option(help="Vocabulary of original .pth.tar checkpoints (default: the one in --data)."),
]
Summary = Annotated[
    bool, typer.Option("--json", help="Print what was written as JSON (progress on stderr).")
]


def _version(value: bool) -> None:
    if value:
        print(f"scan-deploy {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    context: typer.Context,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """SCAN image-text matching, from PyTorch training to embedded inference."""
    _help_without_command(context)


@data_app.callback()
def _data(context: typer.Context) -> None:
    """Data sets in the SCAN precomp format."""
    _help_without_command(context)


def _help_without_command(context: typer.Context) -> None:
    """A group called without a command prints its help and exits 2, as click's own
    `no_args_is_help` would, but without raising an exception that `main` would have to know."""
    if context.invoked_subcommand is None:
        print(context.get_help())
        raise typer.Exit(2)


@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Option(help="Output folder for the precomp files.")],
    train: Annotated[int, typer.Option(min=1, help="Training images.")] = 5000,
    dev: Annotated[int, typer.Option(min=1, help="Validation images.")] = 1000,
    test: Annotated[int, typer.Option(min=1, help="Test images.")] = 1000,
    img_dim: Annotated[int, typer.Option(min=1, help="Region feature size.")] = 2048,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    noise: Annotated[
        float, typer.Option(help="Appearance jitter and feature noise (lower is easier).")
    ] = 1.0,
    pictures: Annotated[
        bool, typer.Option(help="Also draw every image as {split}_images/{row}.png (needs plots).")
    ] = False,
    force: Annotated[bool, typer.Option(help="Replace an existing synthetic data folder.")] = False,
    as_json: Summary = False,
) -> None:
    """Write the synthetic benchmark (train/dev/test + vocabulary) in the precomp format, with
    each region's box beside the features."""
    from dataclasses import asdict

    from scan_deploy.synth import write_synthetic

    with err_console.status(f"writing synthetic benchmark to {out}"):
        summary = write_synthetic(
            out,
            train=train,
            dev=dev,
            test=test,
            img_dim=img_dim,
            seed=seed,
            noise=noise,
            pictures=pictures,
            force=force,
        )
    if as_json:
        print(json.dumps({**asdict(summary), "out": str(summary.out)}))
    else:
        console.print(f"wrote {out}: {summary}")


@data_app.command("import-tsv")
def data_import_tsv(
    tsv: Annotated[
        list[Path], typer.Argument(help="Bottom-up-attention TSV files, read in this order.")
    ],
    out: Annotated[Path, typer.Option(help="Precomp data folder to write the split into.")],
    split: Annotated[str, typer.Option(help="Split name: writes {split}_ims.npy and the rest.")],
    captions: Annotated[
        Path | None,
        typer.Option(help="Captions, 1 or 5 per image a line, in the TSV's image order."),
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace the split's existing files.")] = False,
    as_json: Summary = False,
) -> None:
    """Region features from bottom-up-attention TSV files (image_id, image_w, image_h,
    num_boxes, boxes, features; base64 float32) into a precomp split, streamed: the features,
    and beside them the image ids, the boxes and the image sizes."""
    from dataclasses import asdict

    from scan_deploy.bottom_up_tsv import import_tsv
    from scan_deploy.precomp import read_captions, split_paths
    from scan_deploy.progress import progress_bar, stage_bars

    if not split or not split.replace("_", "").replace("-", "").isalnum():
        raise UserError(f"split: got {split!r}, expected a name of letters, digits, - and _")
    for path in tsv:
        if not path.is_file():
            raise UserError(f"{path}: file not found, expected a bottom-up-attention TSV file")
    existing = split_paths(out, split)[0]
    if existing.exists() and not force:
        raise UserError(f"{existing}: exists; pass --force to replace the split")
    lines = read_captions(captions) if captions is not None else None
    with progress_bar(err_console, transient=True) as progress:
        summary = import_tsv(tsv, out, split, lines, stage_bars(progress, "reading "))
    if as_json:
        print(json.dumps(asdict(summary)))
    else:
        padded = (
            f" (images of {summary.fewest_regions} to {summary.regions} boxes, zero-padded)"
            if summary.fewest_regions < summary.regions
            else ""
        )
        console.print(
            f"wrote split {split!r} to {out}: {summary.images} images × {summary.regions} boxes "
            f"× {summary.features} features{padded}, with ids, boxes and image sizes"
        )


@app.command()
def train(
    data: Annotated[Path, typer.Option(help="Precomp data folder (train/dev splits + vocab).")],
    out: Annotated[Path, typer.Option(help="Run folder (model_best/ and last/ go here).")],
    epochs: Annotated[int, typer.Option(min=1)] = 30,
    batch_size: Annotated[int, typer.Option(min=2)] = 128,
    lr: float = 2e-4,
    lr_update: Annotated[int, typer.Option(help="Divide the lr by 10 every N epochs.")] = 15,
    grad_clip: float = 2.0,
    warmup_epochs: Annotated[
        int, typer.Option(help="Epochs summing all violations before hardest negatives.")
    ] = 0,
    val_images: Annotated[int, typer.Option(help="Dev images used for validation.")] = 1000,
    seed: int = 0,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
    embed_size: int = 1024,
    word_dim: int = 300,
    num_layers: int = 1,
    bi_gru: bool = False,
    precomp_enc_type: str = "basic",
    no_imgnorm: bool = False,
    no_txtnorm: bool = False,
    raw_feature_norm: str = "clipped_l2norm",
    agg_func: str = "LogSumExp",
    cross_attn: str = "t2i",
    lambda_softmax: float = 9.0,
    lambda_lse: float = 6.0,
    margin: float = 0.2,
    max_violation: Annotated[bool, typer.Option(help="Hardest negatives (after warm-up).")] = False,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/last.")] = False,
    as_json: Summary = False,
) -> None:
    """Train SCAN on a precomp data set; keeps the checkpoint with the best dev rsum."""
    from scan_deploy.atomic import sweep_stale
    from scan_deploy.config import ModelConfig
    from scan_deploy.jsonfile import json_safe
    from scan_deploy.precomp import check_feature_dim, find_vocab, load_split
    from scan_deploy.progress import progress_bar
    from scan_deploy.train import BEST, LAST, Trainer, TrainOptions
    from scan_deploy.vocab import Vocabulary

    vocab = Vocabulary.load(find_vocab(data))
    train_split, dev_split = load_split(data, "train"), load_split(data, "dev")
    config = ModelConfig(
        vocab_size=len(vocab),
        img_dim=train_split.feature_dim,
        embed_size=embed_size,
        word_dim=word_dim,
        num_layers=num_layers,
        bi_gru=bi_gru,
        precomp_enc_type=precomp_enc_type,
        no_imgnorm=no_imgnorm,
        no_txtnorm=no_txtnorm,
        raw_feature_norm=raw_feature_norm,
        agg_func=agg_func,
        cross_attn=cross_attn,
        lambda_softmax=lambda_softmax,
        lambda_lse=lambda_lse,
        margin=margin,
        max_violation=max_violation,
    )
    check_feature_dim(dev_split, config.img_dim, data / "dev_ims.npy")
    options = TrainOptions(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        lr_update=lr_update,
        grad_clip=grad_clip,
        warmup_epochs=warmup_epochs,
        val_images=val_images,
        seed=seed,
        device=device,
    )
    if file := next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None):
        raise UserError(f"{file}: is a file, expected a folder (--out: the training run's folder)")
    sweep_stale(out / LAST)  # what killed runs left in the run folder (the sweep is folder-wide)
    if not resume and ((out / LAST).exists() or (out / BEST).exists()):
        raise UserError(f"{out}: already holds a training run (pass --resume, or another --out)")
    if resume and not (out / LAST).exists():
        raise UserError(
            f"{out}: no {LAST}/ to resume from (a run stopped before its first epoch was saved "
            "leaves none): remove the folder or give another --out"
        )
    trainer = Trainer(out, train_split, dev_split, vocab, config, options)
    if resume:
        trainer.resume(out / LAST)
    with progress_bar(err_console if as_json else console) as progress:
        task = progress.add_task("train", total=None)

        def on_batch(loss: float, pairs: int) -> None:
            progress.update(task, advance=pairs, loss=loss)

        def on_epoch(report) -> None:
            m = report.metrics
            mark = " (best)" if report.best else ""
            progress.console.print(
                f"epoch {report.epoch}: loss {report.loss:.3f} lr {report.lr:.1e} "
                f"{'hardest' if report.hardest_negative else 'sum'}-negatives | dev R@1 "
                f"i2t {m['i2t']['r1']:.1f} t2i {m['t2i']['r1']:.1f} rsum {report.rsum:.1f}{mark} "
                f"| {report.seconds:.0f}s"
            )
            if report.epoch + 1 < epochs:
                progress.reset(task, total=None)
                progress.update(task, description=f"train epoch {report.epoch + 1}")
            else:
                progress.remove_task(task)

        progress.update(task, description=f"train epoch {trainer.start_epoch}")
        history = trainer.fit(on_batch, on_epoch)
    if as_json:
        summary = {"best": str(out / BEST), "best_rsum": trainer.best_rsum, "epochs": history}
        print(json.dumps(json_safe(summary)))
    else:
        console.print(f"best checkpoint: {out / BEST} (dev rsum {trainer.best_rsum:.1f})")


@app.command()
def evaluate(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint folder or original .pth.tar.")],
    data: Annotated[Path, typer.Option(help="Precomp data folder.")],
    split: Annotated[
        str, typer.Option(help="Split name (train, dev, test, testall, ...).")
    ] = "test",
    fold5: Annotated[bool, typer.Option(help="COCO protocol: average of 5 folds of 1K.")] = False,
    ensemble: Annotated[
        list[Path] | None, typer.Option(help="More checkpoints whose similarities are averaged.")
    ] = None,
    vocab: DataVocab = None,
    plot: Annotated[
        Path | None, typer.Option(help="Also draw the Recall@K into this PNG (needs plots).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Recall@K, medr and meanr in both directions, and rsum, of one model or an ensemble."""
    from scan_deploy.checkpoint import load_checkpoint
    from scan_deploy.evaluate import evaluate_split
    from scan_deploy.precomp import check_feature_dim, load_split
    from scan_deploy.progress import progress_bar

    checkpoints = [load_checkpoint(p, vocab, data) for p in [checkpoint, *(ensemble or [])]]
    data_split = load_split(data, split)
    for ckpt in checkpoints:
        check_feature_dim(data_split, ckpt.config.img_dim, ckpt.path)
    with progress_bar(err_console, transient=True) as progress:
        total = data_split.num_images * len(checkpoints)
        task = progress.add_task(f"scoring {split}", total=total)
        results = evaluate_split(
            checkpoints, data_split, fold5, lambda n: progress.advance(task, n)
        )
    results["split"] = split
    results["images"] = data_split.num_images
    results["captions"] = data_split.num_captions
    if plot is not None:
        from scan_deploy.recall_plots import write_recall_png

        write_recall_png(plot, results, f"{checkpoint.name} on {split} ({data_split.num_images})")
    if as_json:
        print(json.dumps(results))
    else:
        console.print(recall_table(results, f"{split}: {data_split.num_images} images"))


def recall_table(results: dict, title: str) -> Table:
    table = Table(title=title)
    for column in ("direction", "R@1", "R@5", "R@10", "medr", "meanr"):
        table.add_column(column, justify="right")
    for key, name in (("i2t", "image→text"), ("t2i", "text→image")):
        m = results[key]
        table.add_row(
            name,
            *(f"{m[k]:.1f}" for k in ("r1", "r5", "r10")),
            f"{m['medr']:.0f}",
            f"{m['meanr']:.1f}",
        )
    table.caption = f"rsum {results['rsum']:.1f}"
    return table


@app.command()
def convert(
    original: Annotated[
        Path, typer.Argument(help="Original SCAN checkpoint (model_best.pth.tar).")
    ],
    vocab: Annotated[Path, typer.Option(help="The vocabulary JSON it was trained with.")],
    out: Annotated[Path, typer.Option(help="Output checkpoint folder.")],
    force: Annotated[bool, typer.Option(help="Replace an existing checkpoint folder.")] = False,
    as_json: Summary = False,
) -> None:
    """Convert an original SCAN checkpoint into the safe scan-deploy format (no pickle)."""
    from scan_deploy.atomic import check_output_dir
    from scan_deploy.checkpoint import MARKER, load_original, save_checkpoint
    from scan_deploy.jsonfile import json_safe

    check_output_dir(out, force, MARKER, inputs=[original, vocab])
    checkpoint = load_original(original, vocab)
    save_checkpoint(out, checkpoint.model, checkpoint.vocab, checkpoint.meta)
    if as_json:
        summary = {
            "out": str(out),
            **checkpoint.meta,
            "vocab_size": len(checkpoint.vocab),
            "config": checkpoint.config.to_dict(),
        }
        print(json.dumps(json_safe(summary)))
    else:
        console.print(
            f"wrote {out} ({checkpoint.config.cross_attn}, vocab {len(checkpoint.vocab)})"
        )


@app.command("export")
def export_command(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint folder or original .pth.tar.")],
    out: Annotated[Path, typer.Option(help="Bundle folder to write.")],
    opset: Annotated[int, typer.Option(help="ONNX opset (13 or newer).")] = 17,
    max_batch: Annotated[int, typer.Option(min=1, help="Largest batch engines accept.")] = 256,
    max_words: Annotated[int, typer.Option(min=3, help="Longest caption in tokens.")] = 64,
    regions: Annotated[
        int, typer.Option(min=1, help="Regions per image (the size engines are tuned for).")
    ] = 36,
    min_regions: Annotated[
        int | None,
        typer.Option(
            min=1, help="Fewest regions per image (adaptive features; default --regions)."
        ),
    ] = None,
    max_regions: Annotated[
        int | None,
        typer.Option(
            min=1, help="Most regions per image (adaptive features padded; default --regions)."
        ),
    ] = None,
    vocab: Annotated[
        Path | None, typer.Option(help="Vocabulary for original .pth.tar checkpoints.")
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing bundle folder.")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the parity report as JSON.")
    ] = False,
) -> None:
    """Export the image encoder, text encoder and scorer to ONNX, checked against PyTorch.

    Images of fewer regions than the features' R (adaptive bottom-up features, 10-100 boxes)
    are zero-padded rows and masked by every graph; --min-regions/--max-regions set the range
    of R the engines accept."""
    from scan_deploy.checkpoint import load_checkpoint
    from scan_deploy.export.writer import ShapeRanges, export_bundle

    ckpt = load_checkpoint(checkpoint, vocab)
    ranges = ShapeRanges.create(max_batch, regions, max_words, min_regions, max_regions)
    with err_console.status("exporting and checking against PyTorch"):
        manifest = export_bundle(ckpt, out, opset, ranges, force)
    if as_json:
        print(json.dumps(manifest["export_parity"]))
        return
    console.print(parity_table(manifest["export_parity"], f"{out}: ONNX Runtime vs PyTorch"))


def parity_table(rows: list[dict], title: str) -> Table:
    table = Table(title=title)
    columns = ("graph", "output", "batch", "regions", "max abs", "max rel", "cosine", "tolerance")
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            row["graph"],
            row["output"],
            str(row["batch"]),
            row.get("regions", ""),
            f"{row['max_abs']:.2e}",
            f"{row['max_rel']:.2e}",
            f"{row['cosine']:.8f}",
            f"{row['tolerance']:.0e}",
        )
    return table


@app.command()
def compare(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder written by `export`.")],
    checkpoint: Annotated[Path, typer.Argument(help="The checkpoint it was exported from.")],
    data: Annotated[Path, typer.Option(help="Precomp data folder.")],
    split: Annotated[str, typer.Option(help="Split to compare on.")] = "test",
    vocab: DataVocab = None,
    threads: Threads = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """ONNX Runtime vs PyTorch on real data: per-graph errors and Recall@K of both pipelines.
    Exits 1 when an error exceeds its tolerance or a Recall@K differs."""
    from scan_deploy.bundle import load_bundle
    from scan_deploy.checkpoint import load_checkpoint
    from scan_deploy.export.compare import compare_bundle
    from scan_deploy.precomp import check_feature_dim, load_split
    from scan_deploy.progress import progress_bar

    loaded = load_bundle(bundle)
    ckpt = load_checkpoint(checkpoint, vocab, data)
    data_split = load_split(data, split)
    check_feature_dim(data_split, ckpt.config.img_dim, ckpt.path)
    loaded.check_regions(
        data_split.num_regions, data_split.padded, data_split.features_path, "shape"
    )
    with progress_bar(err_console, transient=True) as progress:
        task = progress.add_task("onnxruntime pipeline", total=data_split.num_captions)
        report = compare_bundle(
            loaded, ckpt, data_split, threads, lambda n: progress.advance(task, n)
        )
    passed = report["recall_identical"] and all(
        row["max_abs"] <= row["tolerance"] for row in report["graphs"]
    )
    report["passed"] = passed
    if as_json:
        print(json.dumps(report))
    else:
        console.print(parity_table(report["graphs"], f"{bundle} vs {checkpoint} ({split} inputs)"))
        table = Table(title=f"Recall@K on {split} ({data_split.num_images} images)")
        for column in ("pipeline", "i2t R@1", "R@5", "R@10", "t2i R@1", "R@5", "R@10", "rsum"):
            table.add_column(column, justify="right")
        for name in ("pytorch", "onnxruntime"):
            m = report[name]
            table.add_row(
                name,
                *(f"{m[d][f'r{k}']:.1f}" for d in ("i2t", "t2i") for k in (1, 5, 10)),
                f"{m['rsum']:.1f}",
            )
        table.caption = (
            f"similarity max abs diff {report['similarity_max_abs']:.2e}; "
            f"{'PASSED' if passed else 'FAILED'}"
        )
        console.print(table)
    if not passed:
        raise typer.Exit(1)


@app.command()
def calibrate(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder written by `export`.")],
    data: Annotated[Path, typer.Option(help="Precomp data folder.")],
    precision: Annotated[
        choices.Precision, typer.Option(help="Variant to write: fp16 or int8.")
    ] = choices.Precision.INT8,
    checkpoint: Annotated[
        Path | None,
        typer.Option(help="FP32 reference checkpoint (default: the one the bundle came from)."),
    ] = None,
    split: Annotated[
        str, typer.Option(help="Split the calibration sample is drawn from.")
    ] = "train",
    samples: Annotated[int, typer.Option(help="Images in the calibration sample.")] = 256,
    method: Annotated[str, typer.Option(help="INT8 ranges: max, entropy or percentile.")] = "max",
    eval_split: Annotated[str, typer.Option(help="Split the accuracy gate runs on.")] = "test",
    seed: Annotated[int, typer.Option(help="Seed of the calibration sample.")] = 0,
    accept_loss: Annotated[
        bool, typer.Option(help="Write the variant even when it misses its accuracy target.")
    ] = False,
    vocab: DataVocab = None,
    threads: Threads = 0,
    plot: Annotated[
        Path | None,
        typer.Option(help="Also draw each pipeline's ΔR@K against the target (needs plots)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """FP16 or INT8 (Q/DQ) graphs from calibration data, gated against the FP32 PyTorch reference:
    |ΔRecall@K| <= 0.3 (fp16) / 1.0 (int8) points on the evaluation split. A variant that misses
    its target is not written (exit 1) unless --accept-loss. int8 also gates and writes the int8
    scorers, which `query` runs on int8 galleries (their stored codes, no dequantization)."""
    from scan_deploy.bundle import load_bundle
    from scan_deploy.calibration.calibrate import CalibrationSettings, calibrate_bundle
    from scan_deploy.checkpoint import load_checkpoint
    from scan_deploy.precomp import check_feature_dim, load_split
    from scan_deploy.progress import progress_bar, stage_bars

    if plot is not None:
        import matplotlib  # noqa: F401 (the plots extra: missing, say so before any work)
    settings = CalibrationSettings(precision, method, samples, seed, split, accept_loss, threads)
    loaded = load_bundle(bundle)
    source = checkpoint or loaded.manifest.get("source", {}).get("checkpoint")
    if source is None or not Path(source).exists():
        raise UserError(f"{bundle}: the source checkpoint {source} is not here: pass --checkpoint")
    ckpt = load_checkpoint(Path(source), vocab, data)
    calibration_split, evaluation_split = load_split(data, split), load_split(data, eval_split)
    for data_split in (calibration_split, evaluation_split):
        check_feature_dim(data_split, ckpt.config.img_dim, ckpt.path)
        regions, padded = data_split.num_regions, data_split.padded
        loaded.check_regions(regions, padded, data_split.features_path, "shape")
    with progress_bar(err_console, transient=True) as progress:
        report = calibrate_bundle(
            loaded, ckpt, calibration_split, evaluation_split, settings, stage_bars(progress)
        )
    if plot is not None:
        from scan_deploy.recall_plots import write_gate_png

        rows = {f"onnxruntime {precision}": report["gate"]["delta_recall"]}
        for kind, scorer_record in report.get("int8_scorers", {}).items():
            rows[f"int8 scorer ({kind} gallery)"] = scorer_record["gate"]["delta_recall"]
        title = f"{bundle} {precision}: ΔR@K on {report['gate']['split_images']} images"
        write_gate_png(plot, rows, report["gate"]["target_delta_recall"], title)
    if as_json:
        print(json.dumps(report))
    else:
        console.print(precision_tables(report, f"{bundle} {precision}"))
    scorers = report.get("int8_scorers", {}).values()
    if not report["written"] or not all(scorer["written"] for scorer in scorers):
        raise typer.Exit(1)


def precision_tables(report: dict, title: str):
    """Element-wise errors per graph output, Recall@K with ΔR@K, what stayed in higher precision,
    and on failure the blame. Non-finite measurements arrive as null and print as such."""
    from rich.console import Group

    def number(value, spec: str) -> str:
        return "not finite" if value is None else format(value, spec)

    gate = report["gate"]
    errors = Table(title=f"{title}: error vs the FP32 PyTorch reference")
    for column in ("graph", "output", "max abs", "max rel", "cosine"):
        errors.add_column(column, justify="left" if column in ("graph", "output") else "right")
    for row in gate["graphs"]:
        errors.add_row(
            row["graph"],
            row["output"],
            number(row["max_abs"], ".2e"),
            number(row["max_rel"], ".2e"),
            number(row["cosine"], ".6f"),
        )
    recall = Table(title=f"Recall@K on {gate['split_images']} images")
    for column in ("pipeline", "i2t R@1", "R@5", "R@10", "t2i R@1", "R@5", "R@10", "rsum"):
        recall.add_column(column, justify="right")
    keys = [f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]
    for name, key in (
        ("pytorch fp32", "reference"),
        (f"onnxruntime {gate['precision']}", "variant"),
    ):
        m = gate[key]
        recall.add_row(
            name,
            *(f"{m[d][f'r{k}']:.2f}" for d in ("i2t", "t2i") for k in (1, 5, 10)),
            f"{m['rsum']:.2f}",
        )
    recall.add_row("Δ", *(f"{gate['delta_recall'][k]:+.2f}" for k in keys), "")
    recall.caption = (
        f"worst |ΔR@K| {number(gate['worst_delta_recall'], '.2f')} "
        f"(target {gate['target_delta_recall']}): {'PASSED' if gate['passed'] else 'FAILED'}; "
        f"similarity max abs {number(gate['similarity_max_abs'], '.2e')}; "
        f"{'written' if report['written'] else 'not written: ' + report['refused']}"
    )
    lines = [errors, recall]
    kept = report["kept_higher_precision"]
    if kept:
        lines.append(
            "kept in higher precision: "
            + ", ".join(f"{k['graph']}:{k['op']} ({len(k['nodes'])} nodes)" for k in kept)
        )
    for blame in gate["blame"]:
        lines.append(
            f"blame: {blame['graph']} alone in {gate['precision']}: "
            f"worst |ΔR@K| {number(blame['worst_delta_recall'], '.2f')}"
        )
    for op in gate["suspect_ops"]:
        lines.append(
            f"suspect op: {op['graph']}:{op['op']} alone in {gate['precision']}: worst |ΔR@K| "
            f"{number(op['worst_delta_recall'], '.2f')} on the calibration sample"
        )
    if "int8_scorers" in report:
        lines.append(int8_scorer_table(report["int8_scorers"], gate["split_images"]))
    return Group(*lines)


def int8_scorer_table(scorers: dict, images: int) -> Table:
    """ΔR@K of each int8-gallery scorer (FP32 encoders, the gallery side as an int8 gallery
    stores it) against the FP32 PyTorch reference, and whether it was written."""
    table = Table(title=f"int8 scorers (int8 galleries, ONNX Runtime CPU): ΔR@K on {images} images")
    for column in ("gallery", "i2t ΔR@1", "ΔR@5", "ΔR@10", "t2i ΔR@1", "ΔR@5", "ΔR@10"):
        table.add_column(column, justify="left" if column == "gallery" else "right")
    table.add_column("worst |ΔR@K|", justify="right")
    table.add_column("result")
    keys = [f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]
    for kind, record in scorers.items():
        gate, deltas = record["gate"], record["gate"]["delta_recall"] or {}
        worst = gate["worst_delta_recall"]
        verdict = "PASSED" if gate["passed"] else "FAILED"
        table.add_row(
            kind,
            *(f"{deltas[key]:+.2f}" if key in deltas else "n/a" for key in keys),
            "not finite" if worst is None else f"{worst:.2f}",
            f"{verdict}, {'written' if record['written'] else 'not written'}",
        )
    return table


@app.command()
def check(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder written by `export`.")],
    target: Annotated[str, typer.Option(help="Deployment target to lint for.")] = "tensorrt",
    dla: Annotated[
        bool, typer.Option(help="Also check for Jetson DLA (static shapes, fallbacks).")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print findings as JSON.")] = False,
) -> None:
    """TensorRT readiness lint: operators, constant axes, Q/DQ rules, manifest vs files (and DLA).
    Exits 1 when the TensorRT ONNX parser would refuse a graph."""
    from dataclasses import asdict

    from scan_deploy.bundle import load_bundle
    from scan_deploy.export.lint import lint_bundle

    if target != "tensorrt":
        raise UserError(f"--target: got {target!r}, expected tensorrt")
    findings = lint_bundle(load_bundle(bundle), dla)
    errors = [f for f in findings if f.severity == "error"]
    if as_json:
        print(json.dumps({"passed": not errors, "findings": [asdict(f) for f in findings]}))
    else:
        table = Table(title=f"{bundle}: TensorRT readiness{' (DLA)' if dla else ''}")
        for column in ("graph", "node", "op", "severity", "message"):
            table.add_column(column)
        for f in findings:
            table.add_row(f.graph, f.node, f.op, f.severity, f.message)
        table.caption = f"{len(errors)} errors, {len(findings) - len(errors)} GPU fallbacks"
        console.print(table if findings else f"{bundle}: no findings, ready for TensorRT")
    if errors:
        raise typer.Exit(1)


@app.command()
def index(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder written by `export`.")],
    features: Annotated[Path, typer.Option(help="Region features (images, regions, img_dim).")],
    out: Annotated[Path, typer.Option(help="Gallery folder to write.")],
    captions: Annotated[
        Path | None,
        typer.Option(help="Captions (1 or 5 per image, one a line) for image->text search."),
    ] = None,
    dtype: Annotated[
        choices.GalleryDtype, typer.Option(help="Storage of the gallery's features.")
    ] = choices.GalleryDtype.FP16,
    shard_size: Annotated[int, typer.Option(min=1, help="Items per shard.")] = 4096,
    backend: Backend = choices.Backend.ONNXRUNTIME,
    precision: GraphPrecision = choices.Precision.FP32,
    threads: Threads = 0,
    checkpoint: TorchCheckpoint = None,
    first_stage: Annotated[
        list[str] | None,
        typer.Option(
            help="STAGE[:FACTORY]: a FAISS index for that --shortlist first stage (global or "
            "maxsim), by index-factory string (default SQfp16; IVF…,SQ8 past 2^20 tokens); "
            "repeat for both. Needs faiss."
        ),
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing gallery folder.")] = False,
    append: Annotated[
        bool,
        typer.Option(
            help="Add the features' images (and captions) to the existing gallery --out, as a "
            "new generation (its dtype, shards and first stages kept)."
        ),
    ] = False,
    ray_workers: Annotated[
        int,
        typer.Option(
            min=0,
            help="Encode the shards on this many Ray Data workers (the ray extra; each uses "
            "--threads threads, default 1). 0: in this process.",
        ),
    ] = 0,
    ray_address: RayAddress = None,
    as_json: Summary = False,
) -> None:
    """Encode images (and captions) once into a sharded, memory-mapped gallery for `query`."""
    from scan_deploy.bundle import load_bundle
    from scan_deploy.progress import progress_bar, stage_bars
    from scan_deploy.runtime.backends import open_backend
    from scan_deploy.runtime.generations import append_gallery
    from scan_deploy.runtime.indexer import index_gallery

    stages = _first_stage_options(first_stage or [])
    if append and (force or stages):
        raise UserError("--append keeps the gallery's settings: not with --force or --first-stage")
    if ray_address is not None and not ray_workers:
        raise UserError("--ray-address: applies with --ray-workers N")
    loaded = load_bundle(bundle)
    opened = open_backend(loaded, backend, precision, threads=threads, checkpoint=checkpoint)
    with contextlib.ExitStack() as stack:
        ray = None
        if ray_workers:
            from scan_deploy.runtime.ray_cluster import gpus_for, ray_cluster
            from scan_deploy.runtime.ray_index import RayIndexing

            stack.enter_context(ray_cluster(ray_address))
            where = None if checkpoint is None else str(checkpoint)
            settings = (str(backend), str(precision), threads or 1, where, gpus_for(opened))
            ray = RayIndexing(ray_workers, *settings)
        progress = stack.enter_context(progress_bar(err_console))
        on_progress = stage_bars(progress, "encoding ")
        if append:
            manifests = append_gallery(
                loaded, opened, out, features, captions, on_progress, ray=ray
            )
        else:
            manifests = index_gallery(
                loaded,
                opened,
                features,
                captions,
                out,
                dtype,
                shard_size,
                force,
                on_progress,
                stages,
                ray=ray,
            )
    counts = {kind: manifest["count"] for kind, manifest in manifests.items()}
    indexed = {kind: manifest["first_stages"] for kind, manifest in manifests.items()}
    if as_json:
        summary = {"out": str(out), **counts, "dtype": dtype, "backend": opened.name}
        summary.update(precision=precision, first_stages=indexed)
        print(json.dumps(summary))
        return
    parts = ", ".join(f"{n} {kind}" for kind, n in counts.items())
    built = indexed["images"]
    extra = "".join(f", {stage} index {record['factory']}" for stage, record in built.items())
    console.print(f"{out}: {parts} ({dtype}, {opened.name}, {precision} graphs{extra})")


@app.command()
def delete(
    gallery: Annotated[Path, typer.Argument(help="Gallery folder written by `index`.")],
    ids: Annotated[
        list[str], typer.Argument(help="Image ids (with their captions) or caption ids.")
    ],
    as_json: Summary = False,
) -> None:
    """Mark gallery items deleted (tombstones: searches skip them), as a new generation."""
    from scan_deploy.runtime.generations import delete_items

    if not gallery.is_dir():
        raise UserError(f"{gallery}: not a gallery folder")
    deleted = delete_items(gallery, ids)
    if as_json:
        print(json.dumps({"gallery": str(gallery), "deleted": deleted}))
        return
    parts = ", ".join(f"{n} {kind}" for kind, n in deleted.items())
    console.print(f"{gallery}: deleted {parts}")


@app.command()
def compact(
    gallery: Annotated[Path, typer.Argument(help="Gallery folder written by `index`.")],
    as_json: Summary = False,
) -> None:
    """Drop the deleted items for good: a new generation of the live ones, first stages
    rebuilt."""
    from scan_deploy.runtime.generations import compact_gallery

    if not gallery.is_dir():
        raise UserError(f"{gallery}: not a gallery folder")
    kept = compact_gallery(gallery)
    if as_json:
        print(json.dumps({"gallery": str(gallery), "kept": kept}))
        return
    console.print(f"{gallery}: kept " + ", ".join(f"{n} {kind}" for kind, n in kept.items()))


@app.command()
def prune(
    gallery: Annotated[Path, typer.Argument(help="Gallery folder written by `index`.")],
    as_json: Summary = False,
) -> None:
    """Remove the generations before the current one that no reader (query, serve, an app's
    Retriever) still has open."""
    from scan_deploy.runtime.generations import prune_generations

    if not gallery.is_dir():
        raise UserError(f"{gallery}: not a gallery folder")
    done = prune_generations(gallery)
    if as_json:
        print(json.dumps({"gallery": str(gallery), **done}))
        return
    removed = ", ".join(map(str, done["removed"])) or "none"
    line = f"{gallery}: generation {done['current']} current; removed {removed}"
    line += f" ({done['freed_bytes'] / 2**20:.1f} MiB freed)"
    if done["in_use"]:
        line += "; in use, kept: " + ", ".join(map(str, done["in_use"]))
    console.print(line, soft_wrap=True)


@app.command()
def query(
    gallery: Annotated[Path, typer.Argument(help="Gallery folder written by `index`.")],
    text: Annotated[list[str] | None, typer.Argument(help="Text queries.")] = None,
    k: Annotated[int, typer.Option("-k", help="Hits per query.")] = 10,
    queries_file: Annotated[
        Path | None, typer.Option(help="More text queries, one a line.")
    ] = None,
    image_features: Annotated[
        Path | None, typer.Option(help="Image queries: region features (.npy) -> captions.")
    ] = None,
    shortlist: Shortlist = None,
    first_stage: FirstStage = None,
    shortlist_engine: ShortlistEngine = choices.ShortlistEngine.AUTO,
    faiss_params: FaissParams = None,
    token_candidates: TokenCandidates = None,
    scorer: ExactScorer = choices.Scorer.AUTO,
    explain: Annotated[
        bool,
        typer.Option(
            "--explain",
            help="Attach the attention behind each hit (JSON) or show the first hit's (table).",
        ),
    ] = False,
    explain_png: Annotated[
        Path | None,
        typer.Option(
            help="Write the attention picture of the first text query's top hit: its image "
            "(with its boxes) when the gallery knows them (PNG; the plots extra).",
        ),
    ] = None,
    bundle: GalleryBundle = None,
    backend: Backend = choices.Backend.ONNXRUNTIME,
    precision: GraphPrecision = choices.Precision.FP32,
    threads: Threads = 0,
    checkpoint: TorchCheckpoint = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON line per query.")] = False,
) -> None:
    """Text->image (texts) and image->text (--image-features) search, all queries batched."""
    from dataclasses import asdict

    import numpy as np

    from scan_deploy.precomp import load_files
    from scan_deploy.runtime.retriever import Retriever

    texts = list(text or [])
    if queries_file is not None:
        texts += [line.strip() for line in _read_lines(queries_file) if line.strip()]
    if not texts and image_features is None:
        raise UserError("no query: give texts, --queries-file or --image-features")
    if explain_png is not None:
        if not texts:
            raise UserError("--explain-png: give a text query (the picture is of its top hit)")
        import matplotlib  # noqa: F401 (the plots extra: missing, say so before any work)
    explain = explain or explain_png is not None
    retriever = Retriever.open(
        bundle,
        gallery,
        backend,
        precision,
        threads=threads,
        checkpoint=checkpoint,
        shortlist_engine=shortlist_engine,
        first_stage=first_stage,
        faiss_params=faiss_params,
        token_candidates=token_candidates,
        scorer=scorer,
    )
    results: list[tuple[str, str, list, list]] = []  # (query, gallery kind, hits, explanations)
    if texts:
        for text, hits in zip(texts, retriever.search_text(texts, k, shortlist), strict=True):
            explained = retriever.explain_text(text, hits) if explain else []
            results.append((text, "images", hits, explained))
    if image_features is not None:
        images = np.asarray(load_files(image_features, None).images)
        found = retriever.search_image(images, k, shortlist, source=image_features)
        for i, hits in enumerate(found):
            explained = retriever.explain_image(images[i], hits) if explain else []
            results.append((f"{image_features.name}[{i}]", "captions", hits, explained))
    if explain_png is not None and results[0][2]:
        text, _, hits, explained = results[0]
        _write_hit_png(explain_png, retriever, text, hits[0], explained[0])
    for name, kind, hits, explained in results:
        boxes = [_hit_boxes(retriever, kind, hit) for hit in hits]
        if as_json:
            rows = [asdict(h) for h in hits]
            for row, result, boxed in zip(rows, explained, boxes, strict=False):
                row["attention"] = result.to_dict()
                shown = result.boxes(boxed)
                if shown is not None:
                    row["attention"].update(boxes=shown[0].tolist(), image_size=list(shown[1]))
            print(json.dumps({"query": name, "hits": rows}))
            continue
        table = Table(title=f"{name!r}")
        for column in ("rank", "id", "score", "text"):
            table.add_column(column, justify="right" if column in ("rank", "score") else "left")
        for rank, hit in enumerate(hits, start=1):
            table.add_row(str(rank), hit.id, f"{hit.score:.4f}", hit.text or "")
        console.print(table)
        if explained:
            shown = explained[0].boxes(boxes[0])
            first = None if shown is None else shown[0]
            console.print(attention_table(explained[0], f"hit 1 ({hits[0].id})", first, 3))


def _write_hit_png(path: Path, retriever, text: str, hit, explanation) -> None:
    """The attention picture of a text query's image hit."""
    from scan_deploy.attention_picture import write_hit_png

    boxed = explanation.boxes(_hit_boxes(retriever, "images", hit))
    write_hit_png(path, text, hit.id, explanation, boxed, hit.image)


def _hit_boxes(retriever, kind: str, hit):
    """An image hit's (boxes, image size) when its gallery has them, else None."""
    return retriever.galleries[kind].boxes_of(hit.index) if kind == "images" else None


@app.command()
def explain(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder written by `export`.")],
    data: Annotated[Path, typer.Option(help="Precomp data folder holding the image.")],
    image: Annotated[int, typer.Option(min=0, help="The image: its row in the split.")],
    split: Annotated[str, typer.Option(help="Split the image is in.")] = "test",
    caption: Annotated[
        int | None, typer.Option(min=0, help="A caption of the split, by line (0-based).")
    ] = None,
    text: Annotated[str | None, typer.Option(help="Or any text to pair the image with.")] = None,
    png: Annotated[
        Path | None, typer.Option(help="Also draw the attention into this PNG (needs plots).")
    ] = None,
    images: Annotated[
        Path | None,
        typer.Option(
            help="Folder of the image files, named by image id (default: {split}_images beside "
            "the split, when there is one)."
        ),
    ] = None,
    top: Annotated[int, typer.Option(min=1, help="Regions listed per word in the table.")] = 3,
    backend: Backend = choices.Backend.ONNXRUNTIME,
    precision: GraphPrecision = choices.Precision.FP32,
    threads: Threads = 0,
    checkpoint: TorchCheckpoint = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """The attention SCAN used to score an image and a caption: for each word, its weights over
    the image's regions (t2i models; i2t: each region's weights over the words), with the
    regions' boxes when the split has them (`data import-tsv`), as a table, JSON or a PNG."""
    import numpy as np

    from scan_deploy.attention_picture import load_picture, write_explain_png
    from scan_deploy.bundle import load_bundle
    from scan_deploy.precomp import image_boxes, image_file, image_ids, load_split
    from scan_deploy.runtime.backends import open_backend
    from scan_deploy.runtime.explain import Explainer

    if (caption is None) == (text is None):
        raise UserError("give one of --caption (a line of the split) or --text")
    if png is not None:
        import matplotlib  # noqa: F401 (the plots extra: missing, say so before any work)
    loaded = load_bundle(bundle)
    opened = open_backend(loaded, backend, precision, threads=threads, checkpoint=checkpoint)
    explainer = Explainer(loaded, opened, threads)
    pairs = load_split(data, split)
    loaded.check_regions(pairs.num_regions, pairs.padded, pairs.features_path, "shape")
    if image >= pairs.num_images:
        raise UserError(f"image: got {image}, the {split} split has {pairs.num_images} images")
    if caption is not None and caption >= pairs.num_captions:
        raise UserError(f"caption: got {caption}, the {split} split has {pairs.num_captions}")
    words = text if text is not None else pairs.captions[caption]
    result = explainer.explain(np.asarray(pairs.images[image], np.float32), words)
    name = image_ids(pairs.features_path, pairs.num_images)[image]
    boxed = image_boxes(pairs.features_path, pairs.num_images, pairs.num_regions)
    regions = result.weights.shape[1]  # the image's, without trailing padding
    boxes = None if boxed is None else np.asarray(boxed[0][image, :regions], np.float32)
    size = None if boxed is None else tuple(int(v) for v in boxed[1][image])
    folder = images if images is not None else data / f"{split}_images"
    picture_path = image_file(folder, name) if folder.is_dir() else None
    if images is not None and picture_path is None:
        raise UserError(f"{folder}: no {name}.png, .jpg or .jpeg (the image's id is {name!r})")
    if png is not None:
        title = f"image {name} × {words!r}: similarity {result.similarity:.4f} ({result.direction})"
        picture = None
        if picture_path is not None and boxes is not None:
            picture = load_picture(picture_path, size)
        write_explain_png(png, result.tokens, result.weights, title, boxes, size, picture)
    if as_json:
        extra = {"image": name, "caption": words, "png": None if png is None else str(png)}
        extra["image_file"] = None if picture_path is None else str(picture_path)
        if boxes is not None:
            extra.update(boxes=boxes.tolist(), image_size=list(size))
        print(json.dumps({**result.to_dict(), **extra}))
        return
    console.print(attention_table(result, f"image {name} × {words!r}", boxes, top))
    if png is not None:
        console.print(f"wrote {png}")


def attention_table(result, title: str, boxes, top: int) -> Table:
    """Each token and its `top` heaviest regions (with their boxes when known)."""
    what = "its regions" if result.direction == "t2i" else "the regions that attend to it"
    table = Table(
        title=f"{title}: similarity {result.similarity:.4f}; each word and {what} "
        f"(weight{', box x1 y1 x2 y2' if boxes is not None else ''})"
    )
    table.add_column("word")
    for rank in range(1, top + 1):
        table.add_column(f"region #{rank}", justify="right")
    for index, token in enumerate(result.tokens):
        cells = []
        for region, weight in result.top_regions(index, top):
            box = "" if boxes is None else " [" + " ".join(f"{v:.0f}" for v in boxes[region]) + "]"
            cells.append(f"{region}: {weight:.3f}{box}")
        table.add_row(token, *cells)
    return table


@app.command("export-triton")
def export_triton_command(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder written by `export`.")],
    out: Annotated[Path, typer.Option(help="Triton model repository folder to write.")],
    backend: Annotated[
        choices.Backend,
        typer.Option(help="onnxruntime: the ONNX graphs; tensorrt: the engines build-engine made."),
    ] = choices.Backend.ONNXRUNTIME,
    precision: GraphPrecision = choices.Precision.FP32,
    queue_delay_us: Annotated[
        int, typer.Option(min=0, help="Dynamic batching: how long Triton waits for more (µs).")
    ] = 100,
    force: Annotated[bool, typer.Option(help="Replace an existing repository.")] = False,
) -> None:
    """A Triton Inference Server model repository: a model per graph (config.pbtxt and the ONNX
    model or TensorRT engine) and an ensemble of the two encoders."""
    from scan_deploy.bundle import load_bundle
    from scan_deploy.export.triton import export_triton

    if backend == choices.Backend.TORCH:
        raise UserError("backend: Triton serves onnxruntime or tensorrt models, not torch")
    configs = export_triton(load_bundle(bundle), out, backend, precision, queue_delay_us, force)
    console.print(f"wrote {out}: {', '.join(configs)} ({backend}, {precision})")


@app.command()
def serve(
    gallery: Annotated[Path, typer.Argument(help="Gallery folder written by `index`.")],
    host: Annotated[
        str, typer.Option(help="Address to listen on (127.0.0.1: this machine only).")
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(min=0, max=65535, help="Port (0: a free one, printed).")
    ] = 8000,
    max_batch: Annotated[int, typer.Option(min=1, help="Queries scored together.")] = 32,
    max_wait_ms: Annotated[
        float, typer.Option(min=0, help="How long a batch waits for more requests (ms).")
    ] = 5.0,
    max_queue: Annotated[
        int, typer.Option(min=1, help="Requests waiting to be batched; beyond: HTTP 503.")
    ] = 64,
    max_queries: Annotated[
        int, typer.Option(min=1, help="Queries in one request; beyond: HTTP 413.")
    ] = 64,
    max_body_mb: Annotated[
        float, typer.Option(min=0.001, help="Largest request body (MiB); beyond: HTTP 413.")
    ] = 16.0,
    ray_actors: Annotated[
        int,
        typer.Option(
            min=0,
            help="Search over this many Ray actors, each holding a part of the shards "
            "(the ray extra; a shortlist's first stage runs in this process). 0: in this process.",
        ),
    ] = 0,
    ray_address: RayAddress = None,
    watch: Annotated[
        float | None,
        typer.Option(
            min=0,
            help="Seconds between looks for a new generation of the gallery (index --append, "
            "delete, compact), served without a restart; 0: never. Default 2; never with "
            "--ray-actors.",
        ),
    ] = None,
    shortlist_engine: ShortlistEngine = choices.ShortlistEngine.AUTO,
    first_stage: FirstStage = None,
    faiss_params: FaissParams = None,
    token_candidates: TokenCandidates = None,
    scorer: ExactScorer = choices.Scorer.AUTO,
    bundle: GalleryBundle = None,
    backend: Backend = choices.Backend.ONNXRUNTIME,
    precision: GraphPrecision = choices.Precision.FP32,
    threads: Threads = 0,
    checkpoint: TorchCheckpoint = None,
) -> None:
    """Serve a gallery over HTTP (the serve extra): a JSON API — text and image search with
    concurrent requests batched, explain, health, readiness, Prometheus metrics, OpenAPI at
    /docs — and a results page at /. Stops on Ctrl-C."""
    import socket

    import uvicorn

    from scan_deploy.runtime.gallery import Checked
    from scan_deploy.runtime.retriever import Retriever
    from scan_deploy.serve.app import ServeSettings, create_app

    if ray_actors and watch:
        raise UserError("--watch: a gallery sharded over Ray actors is not watched (restart it)")
    watch = (0.0 if ray_actors else 2.0) if watch is None else watch
    settings = ServeSettings(
        max_batch, max_wait_ms / 1000, max_queue, max_queries, int(max_body_mb * (1 << 20)), watch
    )
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as exc:
        raise UserError(
            f"--host {host} --port {port}: cannot listen there ({exc.strerror})"
        ) from None
    checked = Checked()  # each generation served later reads only its new files
    with (
        Retriever.open(
            bundle,
            gallery,
            backend,
            precision,
            threads=threads,
            checkpoint=checkpoint,
            verify=checked,
            shortlist_engine=shortlist_engine,
            first_stage=first_stage,
            faiss_params=faiss_params,
            token_candidates=token_candidates,
            scorer=scorer,
        ) as retriever,
        contextlib.ExitStack() as stack,
    ):
        sharded = None
        if ray_actors:
            from scan_deploy.runtime.ray_cluster import ray_cluster
            from scan_deploy.runtime.ray_shards import ShardedRetriever

            stack.enter_context(ray_cluster(ray_address))
            sharded = stack.enter_context(
                ShardedRetriever(
                    retriever.bundle.path,
                    gallery,
                    ray_actors,
                    str(backend),
                    str(precision),
                    threads,
                    retriever=retriever,
                    checkpoint=None if checkpoint is None else str(checkpoint),
                    scorer=str(scorer),
                )  # fmt: skip
            )
        app_ = create_app(retriever, settings, sharded, gallery, checked)
        bound = listener.getsockname()[1]
        message = f"serving {gallery} on http://{host}:{bound}/ (API docs at /docs)"
        err_console.print(message, soft_wrap=True)  # one line: scripts read the address
        server = uvicorn.Server(uvicorn.Config(app_, log_level="warning", access_log=False))
        # uvicorn re-raises the Ctrl-C it shut down on: here the way to stop, not an abort
        with contextlib.suppress(KeyboardInterrupt):
            server.run(sockets=[listener])
    err_console.print("stopped")


@app.command()
def bench(
    gallery: Annotated[Path, typer.Argument(help="Gallery folder written by `index`.")],
    batch: Annotated[
        list[int] | None,
        typer.Option(help="Queries per call, 1 to 4096 (repeat; default 1, 8, 32)."),
    ] = None,
    k: Annotated[int, typer.Option("-k", help="Hits per query.")] = 10,
    shortlist: Shortlist = None,
    first_stage: FirstStage = None,
    shortlist_engine: ShortlistEngine = choices.ShortlistEngine.AUTO,
    faiss_params: FaissParams = None,
    token_candidates: TokenCandidates = None,
    scorer: ExactScorer = choices.Scorer.AUTO,
    warmup: Annotated[int, typer.Option(min=0, help="Untimed calls per batch size.")] = 3,
    iterations: Annotated[int, typer.Option(min=1, help="Timed calls per batch size.")] = 20,
    bundle: GalleryBundle = None,
    backend: Backend = choices.Backend.ONNXRUNTIME,
    precision: GraphPrecision = choices.Precision.FP32,
    threads: Threads = 0,
    checkpoint: TorchCheckpoint = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Text->image search latency (p50/p95/p99), queries/s and pairs/s per batch size, and the
    shortlist's top-k agreement with exhaustive SCAN."""
    from scan_deploy.progress import progress_bar, stage_bars
    from scan_deploy.runtime.bench import check_batch_sizes, run_bench
    from scan_deploy.runtime.retriever import Retriever

    batches = batch or [1, 8, 32]
    check_batch_sizes(batches)
    retriever = Retriever.open(
        bundle,
        gallery,
        backend,
        precision,
        threads=threads,
        checkpoint=checkpoint,
        shortlist_engine=shortlist_engine,
        first_stage=first_stage,
        faiss_params=faiss_params,
        token_candidates=token_candidates,
        scorer=scorer,
    )
    with progress_bar(err_console, transient=True) as progress:
        report = run_bench(
            retriever, batches, k, shortlist, warmup, iterations, progress=stage_bars(progress)
        )
    if as_json:
        print(json.dumps(report))
        return
    title = (
        f"{gallery}: {report['gallery']['items']} images ({report['gallery']['dtype']}), "
        f"{report['backend']}, {report['precision']} graphs, {report['scorer']} scorer, k={k}"
        + (
            f", shortlist {shortlist} ({report['first_stage']} on "
            + (report["first_stage_index"] or report["shortlist_engine"])
            + ")"
            if shortlist
            else ", exhaustive"
        )
    )
    table = Table(title=title)
    for column in ("batch", "p50 ms", "p95 ms", "p99 ms", "mean ms", "queries/s", "pairs/s"):
        table.add_column(column, justify="right")
    for row in report["batches"]:
        table.add_row(
            str(row["batch"]),
            *(f"{row[key]:.2f}" for key in ("p50_ms", "p95_ms", "p99_ms", "mean_ms")),
            f"{row['qps']:.1f}",
            f"{row['pairs_per_s']:,.0f}",
        )
    if "agreement" in report:
        agreement = report["agreement"]
        top_k, top_1 = agreement["top_k_agreement"], agreement["top_1_agreement"]
        (low_k, high_k), (low_1, high_1) = agreement["top_k_ci95"], agreement["top_1_ci95"]
        table.caption = (
            f"shortlist vs exhaustive on {agreement['queries']} queries: "
            f"top-{k} agreement {100 * top_k:.1f}% [95% CI {100 * low_k:.1f}, {100 * high_k:.1f}], "
            f"top-1 {100 * top_1:.1f}% [{100 * low_1:.1f}, {100 * high_1:.1f}]"
        )
    console.print(table)


def _first_stage_options(options: list[str]) -> dict[str, str | None]:
    """`--first-stage STAGE[:FACTORY]` options → {stage: factory or None}."""
    stages: dict[str, str | None] = {}
    for option in options:
        stage, _, factory = option.partition(":")
        stage = choices.FirstStage.parse(stage.strip(), "--first-stage")
        if stage in stages:
            raise UserError(f"--first-stage: {stage} given twice, expected each stage once")
        stages[stage] = factory.strip() or None
    return stages


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read queries ({exc})") from None


@app.command("build-engine")
def build_engine_command(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder written by `export`.")],
    backend: Annotated[
        choices.Backend, typer.Option(help="tensorrt or onnxruntime.")
    ] = choices.Backend.TENSORRT,
    precision: GraphPrecision = choices.Precision.FP32,
    graph: Annotated[
        list[choices.Graph] | None,
        typer.Option(help="Graph to build (repeat; default: all three)."),
    ] = None,
    provider: Annotated[
        choices.Provider, typer.Option(help="ONNX Runtime execution provider.")
    ] = choices.Provider.CPU,
    min_shapes: Annotated[
        list[str] | None,
        typer.Option("--min-shapes", help="trtexec syntax name:1x5x8,... (repeat per profile)."),
    ] = None,
    opt_shapes: Annotated[
        list[str] | None, typer.Option("--opt-shapes", help="As --min-shapes, optimal shapes.")
    ] = None,
    max_shapes: Annotated[
        list[str] | None, typer.Option("--max-shapes", help="As --min-shapes, largest shapes.")
    ] = None,
    workspace: Annotated[
        int | None, typer.Option(min=1, help="TensorRT workspace memory pool limit in MiB.")
    ] = None,
    timing_cache: Annotated[
        Path | None, typer.Option(help="TensorRT timing cache, read if present, then updated.")
    ] = None,
    dla_core: Annotated[
        int | None, typer.Option(min=0, help="Build for this DLA core (GPU fallback, static).")
    ] = None,
    hardware_compat: Annotated[
        bool, typer.Option(help="Engine runs on any Ampere or newer GPU (AMPERE_PLUS).")
    ] = False,
    version_compatible: Annotated[
        bool, typer.Option(help="Engine runs on later TensorRT (same major, or 10 -> 11).")
    ] = False,
    exclude_lean_runtime: Annotated[
        bool, typer.Option(help="With --version-compatible: do not embed the lean runtime.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Build TensorRT engines or ONNX Runtime optimized models from a bundle's graphs, each with
    a JSON sidecar under BUNDLE/engines/ (backend version, device, profiles, source sha256)."""
    from scan_deploy.bundle import load_bundle
    from scan_deploy.engines.build import BuildOptions, build_engines
    from scan_deploy.engines.profiles import format_shape

    options = BuildOptions(
        backend=backend,
        precision=precision,
        graphs=tuple(graph or choices.Graph),
        provider=provider,
        min_shapes=tuple(min_shapes or ()),
        opt_shapes=tuple(opt_shapes or ()),
        max_shapes=tuple(max_shapes or ()),
        workspace_mib=workspace,
        timing_cache=timing_cache,
        dla_core=dla_core,
        hardware_compat=hardware_compat,
        version_compatible=version_compatible,
        exclude_lean_runtime=exclude_lean_runtime,
    )
    loaded = load_bundle(bundle)
    with err_console.status(f"building {backend} engines"):  # stderr: --json keeps stdout
        rows = build_engines(loaded, options)
    if as_json:
        print(json.dumps(rows))
        return
    table = Table(title=f"{bundle}: engines")
    for column in ("graph", "precision", "backend", "file", "size", "profile"):
        table.add_column(column)
    for row in rows:
        profile = "; ".join(
            f"{name} {format_shape(r['min'])}..{format_shape(r['max'])}"
            for p in row["profiles"]
            for name, r in p.items()
            if r["min"] != r["max"]
        )
        version = f"{row['backend']} {row['backend_version']}"
        table.add_row(
            row["graph"],
            row["precision"],
            version + (f" ({row['provider']})" if row["provider"] else ""),
            Path(row["file"]).name,
            f"{row['size'] / 1024:.1f} KiB",
            profile or ("static" if row["profiles"] else "dynamic (ONNX Runtime)"),
        )
    console.print(table)


def main() -> None:
    """Entry point: user mistakes and parser errors print one line and exit 2, never a
    traceback."""
    import logging

    from scan_deploy.allocator import keep_freed_memory

    keep_freed_memory()
    warnings = logging.StreamHandler()  # the runtime's documented warnings, one line each
    warnings.setFormatter(logging.Formatter("warning: %(message)s"))
    logging.getLogger("scan_deploy").addHandler(warnings)
    try:
        code = app(standalone_mode=False)
    except UserError as exc:
        _fail(str(exc), exc.exit_code)
    except typer.TyperException as exc:  # the parser's errors (typer bundles its own click)
        _fail(_parser_message(exc), getattr(exc, "exit_code", 2) or 2)
    except OSError as exc:  # unwritable output, missing folder, disk full: the user's to fix
        where = f"{exc.filename}: " if exc.filename else ""
        _fail(f"{where}{exc.strerror or exc}", 2)
    except (typer.Abort, KeyboardInterrupt):
        err_console.print("aborted")
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


def _fail(message: str, code: int) -> None:
    err_console.print(Text.assemble(("error:", "red"), " ", message), soft_wrap=True)
    sys.exit(code)


def _parser_message(exc: typer.TyperException) -> str:
    """`MESSAGE (see: scan-deploy COMMAND --help)` on one line."""
    message = " ".join(exc.format_message().split())
    context = getattr(exc, "ctx", None)
    if context is None:
        return message
    return f"{message} (see: {context.command_path} --help)"
