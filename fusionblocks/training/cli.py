"""``fusionblocks train`` and ``fusionblocks evaluate`` (added to the CLI through ``add_cli_commands``)."""
from __future__ import annotations

import argparse
import json
from typing import List, Optional

from ..cli import CLIError, _arg_type, _fraction, _non_negative_int, _positive_int


# --workers: auto or a count >= 0 (train, evaluate, predict: engine.data_workers)
_workers = _arg_type(lambda s: s if s == "auto" else int(s), lambda v: v == "auto" or v >= 0,
                     "auto or a non-negative integer")
_WORKERS_HELP = "data-loading worker processes, or auto (default): up to 8 when the model runs on a GPU, none on CPU"


def _class_weights(text: Optional[str]):
    if text is None:
        return "recipe"
    if text in ("none", "balanced", "recipe"):
        return text
    try:
        return [float(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected 'recipe', 'none', 'balanced' or comma-separated numbers, got {text!r}"
        ) from None


def _run_train(args) -> int:
    from ..models.registry import list_models
    from .checkpoint import CheckpointError, file_size_str
    from .data import DataError
    from .engine import RefusedOnRank0, TrainConfig, train
    from .recipes import RECIPES, get_recipe

    if args.recipe is not None and args.recipe not in RECIPES:
        raise CLIError(f"unknown recipe {args.recipe!r}; expected one of {sorted(RECIPES)}")
    model = args.model or (get_recipe(args.recipe).default_model if args.recipe else "hifuse_tiny")
    if model not in list_models():
        import difflib

        close = difflib.get_close_matches(model, list_models(), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise CLIError(f"unknown model {model!r}{hint} Available: {', '.join(list_models())}")
    resume = {None: False, "yes": True, "auto": "auto"}[args.resume]
    if resume and args.overwrite:
        raise CLIError("--resume and --overwrite contradict each other: continue the run in --out, or replace it")
    cfg = TrainConfig(
        model=model, data=args.data, out=args.out, recipe=args.recipe, epochs=args.epochs,
        batch_size=args.batch_size, image_size=args.image_size, lr=args.lr, in_chans=args.in_chans,
        class_weights=args.class_weights, augment=args.augment, seed=args.seed, num_workers=args.workers,
        amp=args.amp, compile=args.compile, grad_checkpointing=args.grad_checkpointing, resume=resume,
        overwrite=args.overwrite, device=args.device, val_fraction=args.val_fraction,
        test_fraction=args.test_fraction, synthetic_samples=args.synthetic_samples,
        synthetic_classes=args.synthetic_classes, max_steps_per_epoch=args.max_steps, progress=not args.no_progress,
        tensorboard=not args.no_tensorboard, plots=not args.no_plots, class_names=args.class_names, init=args.init,
    )
    try:
        result = train(cfg)
    except RefusedOnRank0:  # rank 0 prints the error and fails the job; a failing rank here would have torchrun
        return 0            # stop rank 0, perhaps before it printed, and name this rank as the root cause
    except (DataError, CheckpointError, FileNotFoundError, KeyError, ValueError) as e:
        raise CLIError(str(e)) from None
    if not result:  # a DDP rank other than 0
        return 0
    last = result["epochs"][-1]
    print(f"trained {model} for {len(result['epochs'])} epochs on {len(result['classes'])} classes -> {args.out}")
    print(f"  last epoch: train loss {last['train_loss']:.4f}, val loss {last['val_loss']:.4f}, "
          f"val accuracy {last['val']['accuracy']:.4f}; best val accuracy {result['best_val_accuracy']:.4f} "
          f"(epoch {result['best_epoch']})")
    if "test" in result:
        t = result["test"]
        auc = "n/a" if t["auc"] is None else f"{t['auc']:.4f}"
        print(f"  test (best checkpoint, epoch {t['epoch']}): accuracy {t['accuracy']:.4f}, "
              f"macro F1 {t['f1_macro']:.4f}, AUC {auc}")
    sizes = ", ".join(f"{args.out}/{k} ({file_size_str(v['bytes'])})" for k, v in result["checkpoints"].items())
    print(f"  metrics: {args.out}/metrics.json; checkpoints: {sizes}")
    return 0


def _run_evaluate(args) -> int:
    from .checkpoint import CheckpointError
    from .data import DataError
    from .engine import evaluate

    try:
        m = evaluate(args.checkpoint, args.data, args.out, split=args.split, batch_size=args.batch_size,
                     gradcam=args.gradcam, device=args.device, num_workers=args.workers, progress=not args.no_progress)
    except (DataError, CheckpointError, FileNotFoundError, KeyError, ValueError) as e:
        raise CLIError(str(e)) from None
    if args.json:
        print(json.dumps(m, indent=2))
        return 0
    auc = "n/a" if m["auc"] is None else f"{m['auc']:.4f}"
    kappa = "n/a" if m["kappa"] is None else f"{m['kappa']:.4f}"
    print(f"evaluated {args.checkpoint} (epoch {m['epoch']}) on {m['num_samples']} images ({m['split']}) -> {args.out}")
    print(f"  accuracy {m['accuracy']:.4f}  precision {m['precision_macro']:.4f}  recall {m['recall_macro']:.4f}  "
          f"F1 {m['f1_macro']:.4f}  AUC {auc}  MCC {m['mcc']:.4f}  kappa {kappa}")
    if m.get("gradcam"):
        print(f"  Grad-CAM heatmaps: {len(m['gradcam'])} in {args.out}/gradcam/")
    return 0


def add_cli_commands(sub) -> None:
    t = sub.add_parser(
        "train", help="train a model on an image folder (or synthetic data) with a paper's recipe",
        description="Train on ROOT/{train,val[,test]}/<class>/*.png|jpg|tif|dcm (or ROOT/<class>/*, split with --seed; or "
                    "'synthetic'). Every image is checked before the first step. Writes OUT/metrics.json (one entry "
                    "per epoch), OUT/best.pt (for inference), OUT/last.pt (for --resume), PNG plots and TensorBoard "
                    "scalars.",
    )
    t.add_argument("--model", default=None, help="model name (default: hifuse_tiny, or the --recipe's model)")
    t.add_argument("--data", required=True, help="image folder root, a MedMNIST .npz file, or 'synthetic'")
    t.add_argument("--out", required=True, help="run folder")
    t.add_argument("--recipe", default=None,
                   help="hifuse or hatr (default: the model's: hatr for HATR models, hifuse for HiFuse/HEMF)")
    t.add_argument("--augment", choices=("recipe", "light", "none"), default="recipe",
                   help="training augmentation: the recipe's (default), light (flip, ±5 deg rotation) or none")
    t.add_argument("--epochs", type=_positive_int, default=None, help="default: the recipe's")
    t.add_argument("--batch-size", type=_positive_int, default=None, help="default: the recipe's (32)")
    t.add_argument("--image-size", type=_positive_int, default=224)
    t.add_argument("--lr", type=float, default=None, help="default: the recipe's (1e-4)")
    t.add_argument("--in-chans", type=int, default=3, choices=(1, 3), help="1 reads images as grayscale")
    t.add_argument("--class-weights", type=_class_weights, default="recipe",
                   help="recipe (default), none, balanced (inverse frequency) or comma-separated weights")
    t.add_argument("--init", metavar="PATH", default=None,
                   help="weights to start from instead of random init: a run's best.pt/last.pt of the same model "
                        "(the classifier too when its classes are the same), an official HiFuse/HEMF checkpoint, or "
                        "torchvision ResNet-50 weights for hatr_resnet50's backbone")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--workers", type=_workers, default="auto",
                   help=_WORKERS_HELP)
    t.add_argument("--amp", choices=("auto", "bf16", "fp16", "none"), default="auto", help="autocast on CUDA")
    t.add_argument("--compile", action="store_true", help="torch.compile the model")
    t.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward (less memory)")
    t.add_argument("--resume", nargs="?", const="yes", choices=("yes", "auto"), default=None,
                   help="continue the run in OUT from last.pt (refused if a result-changing setting differs); "
                        "'--resume auto' starts fresh when OUT holds no run")
    t.add_argument("--overwrite", action="store_true",
                   help="replace a run already in OUT (otherwise an existing run is never overwritten)")
    t.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    t.add_argument("--val-fraction", type=_fraction, default=0.15)
    t.add_argument("--test-fraction", type=_fraction, default=0.15)
    t.add_argument("--synthetic-samples", type=_positive_int, default=64)
    t.add_argument("--synthetic-classes", type=_positive_int, default=2)
    t.add_argument("--max-steps", type=_positive_int, default=None, help="cap the steps of each epoch (smoke runs)")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.add_argument("--class-names", type=lambda s: [c.strip() for c in s.split(",")], default=None,
                   help="a,b,c: class names of a MedMNIST .npz (default: medmnist's INFO if installed, else class_i)")
    t.add_argument("--no-tensorboard", action="store_true", help="no TensorBoard scalars in OUT/tensorboard")
    t.add_argument("--no-plots", action="store_true", help="no PNG plots (metrics.json and checkpoints only)")
    t.set_defaults(func=_run_train)

    e = sub.add_parser(
        "evaluate", help="metrics, confusion matrix, ROC and Grad-CAM of a checkpoint on an image folder",
        description="Evaluate CHECKPOINT on DATA (its test/ split if present, else val/, else the whole folder; "
                    "of a single folder ROOT/<class>/* that the run trained on, the test split its seed made; "
                    "or 'synthetic'). --split all takes every split folder. Writes OUT/metrics.json and PNG plots.",
    )
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--data", required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--split", choices=("auto", "test", "val", "train", "all"), default="auto")
    e.add_argument("--batch-size", type=_positive_int, default=32)
    e.add_argument("--gradcam", type=_non_negative_int, default=0, metavar="N",
                   help="save Grad-CAM heatmaps of N images, taking the classes in turn")
    e.add_argument("--device", default=None)
    e.add_argument("--workers", type=_workers, default="auto",
                   help=_WORKERS_HELP)
    e.add_argument("--json", action="store_true", help="print the metrics as JSON")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=_run_evaluate)


__all__: List[str] = ["add_cli_commands"]
