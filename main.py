"""CAFF-DINO command line: train, evaluate, fine-tune, and the CPU demo.

    python main.py -c config/DINO/DINO_5scale_swin.py --dataset_file=flir_fusion --coco_path=./FLIR_aligned_coco \
        --pretrain_model_coco=./coco_pretrained_weights/checkpoint0027_5scale_swin.pth
    python main.py -c CONFIG --coco_path DIR --eval --resume OUTPUT_DIR/checkpoint_best_regular.pth
    torchrun --nproc_per_node=2 main.py -c CONFIG ...          (DDP: NCCL on GPU, gloo on CPU)
    python main.py --demo                                      (synthetic data, tiny model, CPU, 5-8 min on 2 cores)

Follows CAFF-DINO's ``main.py`` (DINO's, with the fusion pretrain path). What differs:
- The config file is the one source of truth. ``--dataset_file --coco_path --output_dir --device --seed
  --num_workers --amp`` are overrides of the config keys of the same name (as is ``--options k=v``); only the
  run options (``--resume --eval --pretrain_model_* --finetune_ignore --allow_unsafe_checkpoint --demo``) are not
  config keys. Unknown keys are errors.
- ``output_dir`` defaults to the config's value; an output dir that already holds ``checkpoint.pth`` is refused
  unless ``--resume`` (or ``--eval``) is given. The reference resumes from it silently and drops the pretrain flags.
  ``--eval`` needs trained weights (``--resume`` or ``--pretrain_model_path``); the reference evaluates a freshly
  initialised model.
- Checkpoints are loaded weights-only and saved atomically (``util/checkpoint.py``); their dict is
  ``util/training_checkpoint.py``, the reference's keys and optimizer group layout, so ``--resume`` works with
  the reference's training checkpoints and the reference's ``--resume`` with ours. Pretrained tensors with the
  wrong shape are skipped and reported (``models/pretrained.py``); loading under DDP keeps every key.
- ``--resume`` applies the config of the run: changed ``lr``, ``lr_backbone``, ``weight_decay``, ``lr_drop`` are
  set on the restored optimizer and scheduler (the reference keeps the checkpoint's values), and every changed key
  is logged ``old -> new``; ``config_cfg.py`` is written after the restore and is the config in effect.
- Checkpoints hold every rank's random generator states and ``--resume`` restores them (same world size), so
  a resumed run continues exactly as an uninterrupted one would (data order, augmentation, DN noise) when
  ``num_workers`` is 0. With workers, the data order is still exact but the workers' augmentation streams restart
  from seeds drawn at resume (persistent workers keep their generators in memory only).
- ``eval_interval`` (not in the reference, which evaluates every epoch) evaluates every k-th epoch and the last.
- With ``use_ema`` each evaluation also scores the EMA weights (``ema_test_*`` in ``log.txt``) and keeps
  ``checkpoint_best_ema.pth`` when their AP improves on their own best (the reference compares it with the best
  of both).
- User errors (bad command line, config, data, checkpoint or output dir, non-finite loss) end the run with one line
  on stderr and exit status 2, instead of a traceback; under torchrun the line comes from rank 0 only and every
  rank exits with 2 (``util.dist.raise_together`` where only some ranks fail).
"""
import argparse
import datetime
import logging
import os
import sys
import time
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler

from datasets.coco_eval import STAT_NAMES
from engine import amp_grad_scaler, evaluate, log_line, train_one_epoch
from models import build_model
from models.pretrained import load_pretrained_caff, load_pretrained_coco
from util import dist
from util.checkpoint import CheckpointError, check_checkpoint_path, copy_checkpoint, save_checkpoint
from util.cli import ArgumentParser
from util.config import Config, ConfigError, load_config, parse_options
from util.device import resolve_device, set_flush_denormal
from util.errors import EXIT_USER_ERROR, DataError, UsageError, UserError, report_user_error, user_message
from util.logger import setup_logger
from util.misc import collate_fn
from util.optim import ModelEma, build_adamw, param_groups
from util.rng import capture_rng_state, restore_rng_state, seed_everything
from util.tensorboard_logger import make_tensorboard_logger
from util.training_checkpoint import ResumeState, build_training_checkpoint, resume_training

# CLI flags that are config keys: given on the command line they override the config value.
CONFIG_OVERRIDES = ('dataset_file', 'coco_path', 'output_dir', 'device', 'seed', 'num_workers', 'amp')
REPO_ROOT = os.path.dirname(os.path.abspath(__file__))
DEMO_CONFIG = os.path.join(REPO_ROOT, 'config', 'DINO', 'CAFF_demo.py')  # CAFF_tiny.py as the demo trains it
DEMO_DATA = 'data/synthetic_llvip'
LAST_CHECKPOINT = 'checkpoint.pth'
BEST_CHECKPOINT = 'checkpoint_best_regular.pth'
BEST_EMA_CHECKPOINT = 'checkpoint_best_ema.pth'

logger = logging.getLogger('caff_dino')


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser('main.py', description='CAFF-DINO: RGB + thermal DINO detector.')
    parser.add_argument('--config_file', '-c', help='Python config file, e.g. config/DINO/DINO_4scale.py')
    parser.add_argument('--demo', action='store_true',
                        help=f'generate the synthetic data set into {DEMO_DATA} (if absent), train '
                             'config/DINO/CAFF_demo.py on it on the CPU and evaluate')
    parser.add_argument('--options', nargs='+', metavar='KEY=VALUE', default=[],
                        help='override config keys, e.g. --options epochs=2 lr=2e-4 caff_kernel_sizes=[1,5,7]')
    keys = parser.add_argument_group('config keys (override the config file)')
    keys.add_argument('--dataset_file', help='llvip_fusion, flir_fusion, synthetic or kaist_fusion')
    keys.add_argument('--coco_path', help='data set root directory')
    keys.add_argument('--output_dir', help='where checkpoints, log.txt and info.txt go')
    keys.add_argument('--device', help="'auto', 'cpu', 'cuda' or 'cuda:N'")
    keys.add_argument('--seed', type=int)
    keys.add_argument('--num_workers', type=int)
    keys.add_argument('--amp', action='store_true', default=None, help='mixed precision (bf16 on CPU)')
    run = parser.add_argument_group('run options')
    run.add_argument('--resume', metavar='CKPT', help='continue training (or --eval) from this checkpoint; the '
                                                      "run's config applies (changed lr, lr_drop, ... are logged)")
    run.add_argument('--eval', action='store_true',
                     help='evaluate only (needs --resume or --pretrain_model_path)')
    run.add_argument('--pretrain_model_coco', metavar='CKPT',
                     help='mono-spectral DINO COCO checkpoint: initialises both branches, fusion stays fresh')
    run.add_argument('--pretrain_model_path', metavar='CKPT',
                     help='CAFF-DINO checkpoint to fine-tune from; tensors of another shape are skipped')
    run.add_argument('--finetune_ignore', nargs='+', default=[], metavar='SUBSTRING',
                     help='keys containing any of these substrings are not loaded from pretrained checkpoints')
    run.add_argument('--allow_unsafe_checkpoint', action='store_true',
                     help='unpickle checkpoints beyond tensors and plain values (only for files you trust)')
    return parser


# ------------------------------------------------------------------------------------------------------ setup

def load_run_config(args: argparse.Namespace):
    """The config file merged with ``--options`` and the config-key flags (flags win over ``--options``)."""
    if args.demo:
        args.config_file = args.config_file or DEMO_CONFIG
        if args.coco_path is None:
            args.coco_path = DEMO_DATA
    if not args.config_file:
        raise UsageError('main.py: a config file is required: -c config/DINO/<name>.py (or --demo)')
    options = parse_options(args.options)
    options.update({k: getattr(args, k) for k in CONFIG_OVERRIDES if getattr(args, k) is not None})
    return load_config(args.config_file, options)


def check_run_options(args: argparse.Namespace, output_dir: str) -> None:
    """Flags that cannot run together, ``--eval`` without weights, checkpoint paths that do not exist, an output
    dir holding another run: each a ``UsageError`` / ``CheckpointError`` before anything slow starts."""
    pretrain = [f for f in ('pretrain_model_coco', 'pretrain_model_path') if getattr(args, f)]
    if args.resume and pretrain:
        raise UsageError(f'--resume restores a whole run; it cannot be combined with --{pretrain[0]}')
    if any(not substring.strip() for substring in args.finetune_ignore):
        raise UsageError("--finetune_ignore '': an empty substring is part of every key, so nothing would load; "
                         'give substrings of the keys to leave out, e.g. --finetune_ignore class_embed')
    if args.eval and not (args.resume or args.pretrain_model_path):
        raise UsageError('--eval needs trained weights: pass --resume CKPT or --pretrain_model_path CKPT (a freshly '
                         'initialised model gives meaningless numbers)')
    for flag in ('resume', 'pretrain_model_coco', 'pretrain_model_path'):
        if getattr(args, flag):
            check_checkpoint_path(getattr(args, flag), f'--{flag}')
    last = os.path.join(output_dir, LAST_CHECKPOINT)
    if os.path.exists(last) and not args.resume and not args.eval:
        raise UsageError(f'output dir {output_dir!r} already holds {LAST_CHECKPOINT}: continue with --resume {last}, '
                         'or choose a fresh --output_dir')


def prepare_output_dir(output_dir: str) -> None:
    """Create ``output_dir``; a path that is a file or cannot be written is a ``UsageError`` naming it."""
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as e:
        raise UsageError(f'output dir {output_dir!r} cannot be created ({e.strerror or e}); choose another '
                         '--output_dir') from None
    if not os.access(output_dir, os.W_OK | os.X_OK):
        raise UsageError(f'output dir {output_dir!r} is not writable; choose another --output_dir')


def prepare_demo_data(root: str) -> None:
    """Write the synthetic LLVIP-layout data set into ``root`` unless it is there already."""
    if os.path.isdir(root) and os.listdir(root):
        logger.info(f'demo: using the synthetic data set in {root}')
        return
    from datasets.synthetic import generate_synthetic_dataset
    logger.info(f'demo: generating the synthetic data set into {root}')
    generate_synthetic_dataset(root)


def setup(args: argparse.Namespace) -> tuple[Config, torch.device, bool]:
    """Config, device, process group, output dir and logger: ``(cfg, device, distributed)``."""
    cfg = load_run_config(args)
    flushing = set_flush_denormal(cfg.flush_denormal)  # before any kernel starts torch's threads, which inherit it
    device = resolve_device(cfg.device)
    distributed = dist.init_distributed(device)
    if distributed and device.type == 'cuda':
        device = torch.device('cuda', torch.cuda.current_device())
    check_run_options(args, cfg.output_dir)
    if args.demo:
        def demo_data():
            setup_logger(None, dist.get_rank())
            prepare_demo_data(cfg.coco_path)
        dist.run_on_main(demo_data)
    prepare_output_dir(cfg.output_dir)
    setup_logger(cfg.output_dir, dist.get_rank())
    logger.info('command: ' + ' '.join(sys.argv))
    if args.demo:  # the trajectory depends on the thread count (OMP_NUM_THREADS=1 for one)
        logger.info(f'demo: {torch.get_num_threads()} torch threads')
    subnormals = ('flushed to 0' if flushing else 'kept: this CPU cannot flush them') if cfg.flush_denormal else 'kept'
    logger.info(f'config: {args.config_file}; output dir: {os.path.abspath(cfg.output_dir)}; device: {device}; '
                f'world size: {dist.get_world_size()}; CPU subnormal floats {subnormals}')
    seed_everything(cfg.seed + dist.get_rank())
    return cfg, device, distributed


def make_loaders(cfg, distributed: bool, train: bool = True):
    """``(loader_train, loader_val, sampler_train, dataset_val)``; a data problem is a ``DataError``.

    ``train=False`` (``--eval``) builds and checks the val split alone: the train split need not exist, and
    ``loader_train`` and ``sampler_train`` are None.
    """
    from datasets import BadPairError, build_dataset
    from datasets.check import check_before_training
    splits = ('train', 'val') if train else ('val',)
    try:
        datasets = {split: build_dataset(split, cfg) for split in splits}
    except (ValueError, KeyError, FileNotFoundError, BadPairError) as e:
        # datasets/ raises these with a message naming the file or key; here they are the user's data problem.
        raise DataError(e.args[0] if e.args else repr(e)) from None
    check_before_training(datasets)
    dataset_val = datasets['val']
    sampler_val = DistributedSampler(dataset_val, shuffle=False) if distributed else SequentialSampler(dataset_val)
    # Validation runs one image per batch, as in the reference (no padding between images).
    loader_val = DataLoader(dataset_val, batch_size=1, sampler=sampler_val, drop_last=False,
                            collate_fn=collate_fn, num_workers=cfg.num_workers)
    if not train:
        return None, loader_val, None, dataset_val
    dataset_train = datasets['train']
    if len(dataset_train) < cfg.batch_size * dist.get_world_size():
        raise UsageError(f'the train split has {len(dataset_train)} image pairs, fewer than one batch of '
                         f'batch_size={cfg.batch_size} per process; lower batch_size or add data')
    sampler_train = (DistributedSampler(dataset_train, shuffle=True, seed=cfg.seed) if distributed
                     else RandomSampler(dataset_train))
    loader_train = DataLoader(dataset_train, batch_size=cfg.batch_size, sampler=sampler_train, drop_last=True,
                              collate_fn=collate_fn, num_workers=cfg.num_workers,
                              persistent_workers=cfg.num_workers > 0)
    return loader_train, loader_val, sampler_train, dataset_val


@dataclass
class Training:
    """What a run trains and evaluates: the (unwrapped) model and everything that updates or scores it."""
    model: torch.nn.Module
    criterion: torch.nn.Module
    postprocessors: dict
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.StepLR
    ema: ModelEma | None
    n_parameters: int


def reference_backbone_names(cfg) -> set[str]:
    """The backbone parameters the reference's optimizer lists although ``freeze_backbones`` froze them: those a
    build without freezing leaves trainable (built on the meta device; the generators are left as they were)."""
    if not cfg.freeze_backbones:
        return set()
    states = capture_rng_state(torch.device('cpu'))
    with torch.device('meta'):
        unfrozen, _, _ = build_model(Config({**cfg.to_dict(), 'freeze_backbones': False}))
    restore_rng_state(states, torch.device('cpu'))
    return {name for name, p in unfrozen.named_parameters() if 'backbone' in name and p.requires_grad}


def build_training(cfg, device: torch.device) -> Training:
    """Model, criterion and post-processors on ``device``; AdamW in the reference's group layout; StepLR; EMA.

    A constructor that refuses a config value (a ``ValueError`` naming it, one the config rules let through) is a
    ``ConfigError``: the config is the user's to fix.
    """
    try:
        model, criterion, postprocessors = build_model(cfg)
    except ValueError as e:
        raise ConfigError(f'the model cannot be built from this config: {e}') from None
    model.to(device)
    criterion.to(device)
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(f'number of trainable params: {n_parameters:,}')
    groups = param_groups(model, cfg.lr, cfg.lr_backbone, reference_backbone_names(cfg))
    optimizer = build_adamw(groups, cfg.lr, cfg.weight_decay)
    lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, cfg.lr_drop)
    ema = ModelEma(model, cfg.ema_decay) if cfg.use_ema else None
    return Training(model, criterion, postprocessors, optimizer, lr_scheduler, ema, n_parameters)


# ---------------------------------------------------------------------------------------------------- restore

def restore(args: argparse.Namespace, cfg, training: Training) -> ResumeState:
    """``--resume`` (the whole run, with the config's hyperparameters applied) or the ``--pretrain_model_*``
    weights; the EMA starts from the weights in effect unless the checkpoint held one."""
    ckpt_kw = dict(allow_unsafe=args.allow_unsafe_checkpoint)
    state = ResumeState()
    ema_restored = False
    if args.resume:
        train = not args.eval
        state = resume_training(args.resume, training.model, cfg.to_dict(),
                                training.optimizer if train else None, training.lr_scheduler if train else None,
                                training.ema, **ckpt_kw)
        ema_restored = state.ema_restored
        logger.info(f'resumed from {args.resume}: next epoch {state.start_epoch}, best AP {state.best.metric:.4f}')
        for line in state.notes:
            logger.info(f'resume: {line}')
        for line in state.changes:
            logger.warning(f'resume: config changed, the new value applies: {line}')
    if args.pretrain_model_coco:
        logger.info(load_pretrained_coco(training.model, args.pretrain_model_coco, args.finetune_ignore,
                                         **ckpt_kw).summary())
    if args.pretrain_model_path:
        logger.info(load_pretrained_caff(training.model, args.pretrain_model_path, args.finetune_ignore,
                                         **ckpt_kw).summary())
    if training.ema is not None and not ema_restored:
        training.ema = ModelEma(training.model, cfg.ema_decay)  # start the average from the weights in effect
    return state


def restore_generators(args: argparse.Namespace, rng_states, device: torch.device) -> None:
    """Put every rank's generators where the checkpoint left them; last, so that nothing before draws from them."""
    per_rank = isinstance(rng_states, (list, tuple))
    if per_rank and len(rng_states) == dist.get_world_size():
        try:
            restore_rng_state(rng_states[dist.get_rank()], device)
        except (TypeError, ValueError, KeyError, IndexError, RuntimeError) as e:
            raise CheckpointError(f'--resume {args.resume!r}: its rng_state entry is damaged ({type(e).__name__}: '
                                  f'{e}); resume from another checkpoint of the run') from None
        return
    saved = f'{len(rng_states)} processes' if per_rank else 'none' if rng_states is None else 'no readable list'
    logger.warning(f'{args.resume} holds random generator states for {saved}, this run has '
                   f'{dist.get_world_size()}: the resumed run keeps its seeded generators, so its data order '
                   'and augmentations differ from those of an uninterrupted run')


# -------------------------------------------------------------------------------------------------------- fit

def coco_table(stats: list[float]) -> str:
    return '  '.join(f'{name} {100 * v:.1f}' for name, v in zip(STAT_NAMES, stats))


def fit(cfg, training: Training, model: torch.nn.Module, loaders: tuple, state: ResumeState, device: torch.device,
        distributed: bool) -> dict:
    """Train epochs ``state.start_epoch .. epochs - 1``; after each: evaluate (and the EMA weights) when it is an
    ``eval_interval``-th epoch or the last, save the checkpoints, append the ``log.txt`` line (``test_*`` keys only
    when evaluated; the best checkpoints are chosen among the evaluated epochs). ``model`` is ``training.model`` or
    its DDP wrapper."""
    loader_train, loader_val, sampler_train, dataset_val = loaders
    output_dir = cfg.output_dir
    last_ckpt = os.path.join(output_dir, LAST_CHECKPOINT)
    scaler = amp_grad_scaler(device, cfg.amp, cfg.amp_dtype)
    best, ema = state.best, training.ema
    eval_args = (training.criterion, training.postprocessors, loader_val, dataset_val.coco, device)
    stats: dict = {}
    ema_stats: dict = {}
    logger.info(f'training epochs {state.start_epoch}..{cfg.epochs - 1}')
    tb_logger = make_tensorboard_logger(cfg.tensorboard, output_dir) if dist.is_main_process() else None
    start_time = time.time()
    for epoch in range(state.start_epoch, cfg.epochs):
        epoch_start = time.time()
        if distributed:
            sampler_train.set_epoch(epoch)
        try:
            train_stats = train_one_epoch(model, training.criterion, loader_train, training.optimizer, device, epoch,
                                          cfg.clip_max_norm, cfg.amp, scaler,
                                          ema if epoch >= cfg.ema_epoch else None, cfg.print_freq, tb_logger,
                                          cfg.amp_dtype)
        except UserError as e:  # a non-finite loss, a pair that fails to load: say what was kept
            kept = f'{last_ckpt} (epoch {epoch - 1})' if os.path.exists(last_ckpt) else 'none (no epoch completed)'
            raise type(e)(f'{user_message(e)}. Last good checkpoint: {kept}') from None
        training.lr_scheduler.step()
        stats, ema_stats, improved, ema_improved = {}, {}, False, False
        evaluated = (epoch + 1) % cfg.eval_interval == 0 or epoch == cfg.epochs - 1
        if evaluated:
            stats, _ = evaluate(model, *eval_args, output_dir, cfg.amp, cfg.print_freq, dataset_val.image_id_map,
                                cfg.eval_missing_modality, cfg.amp_dtype)
            selected = stats['selection']  # COCO AP, or the data set's own metric (KAIST: 1 - MR^-2 all)
            improved = selected['value'] > best.metric
            if improved:
                best.metric, best.epoch = selected['value'], epoch
        if evaluated and ema is not None:
            ema_stats, _ = evaluate(ema.module, *eval_args, None, cfg.amp, cfg.print_freq,
                                    missing_modality=cfg.eval_missing_modality, amp_dtype=cfg.amp_dtype)
            ema_improved = ema_stats['selection']['value'] > best.ema_metric
            if ema_improved:
                best.ema_metric, best.ema_epoch = ema_stats['selection']['value'], epoch
        rng_states = dist.all_gather(capture_rng_state(device))  # every rank has its own generators

        def save_and_log():
            checkpoint = build_training_checkpoint(training.model, training.optimizer, training.lr_scheduler, epoch,
                                                   cfg.to_dict(), best, rng_states,
                                                   ema.module if ema is not None else None)
            save_checkpoint(checkpoint, last_ckpt)
            if improved:
                copy_checkpoint(last_ckpt, os.path.join(output_dir, BEST_CHECKPOINT))
            if ema_improved:  # the reference's layout: the EMA weights as the model
                save_checkpoint(build_training_checkpoint(training.model, training.optimizer, training.lr_scheduler,
                                                          epoch, cfg.to_dict(), best, rng_states,
                                                          weights=ema.module),
                                os.path.join(output_dir, BEST_EMA_CHECKPOINT))
            if cfg.save_checkpoint_interval > 0 and (epoch + 1) % cfg.save_checkpoint_interval == 0:
                copy_checkpoint(last_ckpt, os.path.join(output_dir, f'checkpoint{epoch:04}.pth'))
            record = {**{f'train_{k}': v for k, v in train_stats.items()},
                      **{f'test_{k}': v for k, v in stats.items()},
                      'epoch': epoch, 'n_parameters': training.n_parameters, 'best_res': best.metric,
                      'best_ep': best.epoch,
                      'epoch_time': str(datetime.timedelta(seconds=int(time.time() - epoch_start))),
                      'now_time': str(datetime.datetime.now())}
            if ema is not None:
                record.update({**{f'ema_test_{k}': v for k, v in ema_stats.items()},
                               'ema_best_res': best.ema_metric, 'ema_best_ep': best.ema_epoch})
            log_line(os.path.join(output_dir, 'log.txt'), record)
            if tb_logger is not None:
                tb_logger.log_epoch(epoch, train_stats, stats, STAT_NAMES)

        dist.run_on_main(save_and_log)
        if not evaluated:
            logger.info(f'epoch {epoch}: trained; eval_interval={cfg.eval_interval}, so it is not evaluated')
            continue
        logger.info(f'epoch {epoch}: {coco_table(stats["coco_eval_bbox"])}  (best {selected["name"]} '
                    f'{100 * best.metric:.1f} at epoch {best.epoch})')
        if ema is not None:
            logger.info(f'epoch {epoch}, EMA weights: {coco_table(ema_stats["coco_eval_bbox"])}  (best '
                        f'{selected["name"]} {100 * best.ema_metric:.1f} at epoch {best.ema_epoch})')
    if tb_logger is not None:
        tb_logger.close()
    logger.info(f'training time {datetime.timedelta(seconds=int(time.time() - start_time))}')
    if stats:
        logger.info(f'final (epoch {cfg.epochs - 1}): {coco_table(stats["coco_eval_bbox"])}; best '
                    f'{stats["selection"]["name"]} {100 * best.metric:.1f} at epoch {best.epoch}')
        if ema is not None:
            logger.info(f'final (epoch {cfg.epochs - 1}), EMA weights: {coco_table(ema_stats["coco_eval_bbox"])}; '
                        f'best {100 * best.ema_metric:.1f} at epoch {best.ema_epoch}')
    names = [LAST_CHECKPOINT, BEST_CHECKPOINT] + ([BEST_EMA_CHECKPOINT] if ema is not None else [])
    logger.info('checkpoints: ' + ', '.join(os.path.abspath(os.path.join(output_dir, n)) for n in names))
    logger.info(f'logs: {os.path.abspath(os.path.join(output_dir, "log.txt"))}, '
                f'{os.path.abspath(os.path.join(output_dir, "info.txt"))}')
    return stats


def evaluate_only(args: argparse.Namespace, cfg, training: Training, model: torch.nn.Module, loaders: tuple,
                  device: torch.device) -> dict:
    """``--eval``: one evaluation pass, its ``log.txt`` line and the detections file."""
    _, loader_val, _, dataset_val = loaders
    stats, _ = evaluate(model, training.criterion, training.postprocessors, loader_val, dataset_val.coco, device,
                        cfg.output_dir, cfg.amp, cfg.print_freq, dataset_val.image_id_map,
                        cfg.eval_missing_modality, cfg.amp_dtype)
    record = {'mode': 'eval', 'checkpoint': args.resume or args.pretrain_model_path,
              **{f'test_{k}': v for k, v in stats.items()}}
    dist.run_on_main(lambda: log_line(os.path.join(cfg.output_dir, 'log.txt'), record))
    logger.info(f'eval: {coco_table(stats["coco_eval_bbox"])}')
    logger.info(f'detections: {os.path.join(cfg.output_dir, "detections_bbox.json")}')
    return stats


def run(args: argparse.Namespace) -> tuple[torch.nn.Module, dict]:
    """Everything after parsing; returns the (unwrapped) model and the last evaluation stats."""
    run_start = time.time()
    cfg, device, distributed = setup(args)
    loaders = make_loaders(cfg, distributed, train=not args.eval)
    training = build_training(cfg, device)
    state = restore(args, cfg, training)
    if args.resume and not args.eval and state.start_epoch >= cfg.epochs:
        raise UsageError(f'--resume {args.resume}: the run has completed epoch {state.start_epoch - 1} and epochs='
                         f'{cfg.epochs}, so nothing is left to train; raise epochs (--options epochs=N) to train '
                         'on, or add --eval to evaluate it')
    dist.run_on_main(lambda: cfg.dump(os.path.join(cfg.output_dir, 'config_cfg.py')))  # the config in effect
    model = training.model
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == 'cuda' else None)
    if args.eval:
        return training.model, evaluate_only(args, cfg, training, model, loaders, device)
    if args.resume:
        restore_generators(args, state.rng_state, device)
    stats = fit(cfg, training, model, loaders, state, device, distributed)
    logger.info(f'whole run {datetime.timedelta(seconds=int(time.time() - run_start))}')
    return training.model, stats


def main(argv: list[str] | None = None) -> int:
    try:
        run(get_args_parser().parse_args(argv))
    except UserError as e:
        if dist.launch_rank() == 0:  # every rank raises the same error; one line for the run
            report_user_error(e)
        return EXIT_USER_ERROR
    finally:
        if dist.is_dist_avail_and_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == '__main__':
    sys.exit(main())
