"""CAFF-DINO command line: train, evaluate, fine-tune, and the CPU demo.

    python main.py -c config/DINO/DINO_5scale_swin.py --dataset_file=flir_fusion --coco_path=./FLIR_aligned_coco \
        --pretrain_model_coco=./coco_pretrained_weights/checkpoint0027_5scale_swin.pth
    python main.py -c CONFIG --coco_path DIR --eval --resume OUTPUT_DIR/checkpoint_best_regular.pth
    torchrun --nproc_per_node=2 main.py -c CONFIG ...          (DDP: NCCL on GPU, gloo on CPU)
    python main.py --demo                                      (synthetic data, tiny model, CPU, < 10 min)

Follows CAFF-DINO's ``main.py`` (DINO's, with the fusion pretrain path). What differs:
- The config file is the one source of truth. ``--dataset_file --coco_path --output_dir --device --seed
  --num_workers --amp`` are overrides of the config keys of the same name (as is ``--options k=v``); only the
  run options (``--resume --eval --pretrain_model_* --finetune_ignore --allow_unsafe_checkpoint --demo``) are not
  config keys. Unknown keys are errors.
- ``output_dir`` defaults to the config's value; an output dir that already holds ``checkpoint.pth`` is refused
  unless ``--resume`` (or ``--eval``) is given. The reference resumes from it silently and drops the pretrain flags.
- Checkpoints are loaded weights-only and saved atomically (``util/checkpoint.py``); pretrained tensors with the
  wrong shape are skipped and reported; loading under DDP keeps every key.
- Checkpoints hold every rank's random generator states and ``--resume`` restores them (same world size), so
  a resumed run continues exactly as an uninterrupted one would (data order, augmentation, DN noise) when
  ``num_workers`` is 0. With workers, the data order is still exact but the workers' augmentation streams restart
  from seeds drawn at resume (persistent workers keep their generators in memory only).
- User errors (bad config, missing data, unreadable checkpoint, non-finite loss) end the run with one line on
  stderr and exit status 2, instead of a traceback.
"""
import argparse
import datetime
import logging
import os
import sys
import time

import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler

from datasets.coco_eval import STAT_NAMES
from engine import NonFiniteLossError, evaluate, log_line, train_one_epoch
from util import dist
from util.checkpoint import (capture_rng_state, copy_checkpoint, load_pretrained_caff,
                             load_pretrained_coco, restore_rng_state, resume_from, save_checkpoint)
from util.config import load_config, parse_options
from util.device import resolve_device
from util.errors import DataError, UsageError, UserError, report_user_error
from util.logger import setup_logger
from util.misc import collate_fn, seed_everything
from util.optim import ModelEma, param_groups

# CLI flags that are config keys: given on the command line they override the config value.
CONFIG_OVERRIDES = ('dataset_file', 'coco_path', 'output_dir', 'device', 'seed', 'num_workers', 'amp')
REPO_ROOT = os.path.dirname(os.path.abspath(__file__))
DEMO_CONFIG = os.path.join(REPO_ROOT, 'config', 'DINO', 'CAFF_tiny.py')
DEMO_DATA = 'data/synthetic_llvip'

logger = logging.getLogger('caff_dino')


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser('main.py', description='CAFF-DINO: RGB + thermal DINO detector.')
    parser.add_argument('--config_file', '-c', help='Python config file, e.g. config/DINO/DINO_4scale.py')
    parser.add_argument('--demo', action='store_true',
                        help=f'generate the synthetic data set into {DEMO_DATA} (if absent), train '
                             'config/DINO/CAFF_tiny.py on it on the CPU and evaluate')
    parser.add_argument('--options', nargs='+', metavar='KEY=VALUE', default=[],
                        help='override config keys, e.g. --options epochs=2 lr=2e-4 caff_kernel_sizes=[1,5,7]')
    keys = parser.add_argument_group('config keys (override the config file)')
    keys.add_argument('--dataset_file', help='llvip_fusion, flir_fusion or synthetic')
    keys.add_argument('--coco_path', help='data set root directory')
    keys.add_argument('--output_dir', help='where checkpoints, log.txt and info.txt go')
    keys.add_argument('--device', help="'auto', 'cpu', 'cuda' or 'cuda:N'")
    keys.add_argument('--seed', type=int)
    keys.add_argument('--num_workers', type=int)
    keys.add_argument('--amp', action='store_true', default=None, help='mixed precision (bf16 on CPU)')
    run = parser.add_argument_group('run options')
    run.add_argument('--resume', metavar='CKPT', help='continue training (or --eval) from this checkpoint')
    run.add_argument('--eval', action='store_true', help='evaluate only')
    run.add_argument('--pretrain_model_coco', metavar='CKPT',
                     help='mono-spectral DINO COCO checkpoint: initialises both branches, fusion stays fresh')
    run.add_argument('--pretrain_model_path', metavar='CKPT',
                     help='CAFF-DINO checkpoint to fine-tune from; tensors of another shape are skipped')
    run.add_argument('--finetune_ignore', nargs='+', default=[], metavar='SUBSTRING',
                     help='keys containing any of these substrings are not loaded from pretrained checkpoints')
    run.add_argument('--allow_unsafe_checkpoint', action='store_true',
                     help='unpickle checkpoints beyond tensors and plain values (only for files you trust)')
    return parser


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
    pretrain = [f for f in ('pretrain_model_coco', 'pretrain_model_path') if getattr(args, f)]
    if args.resume and pretrain:
        raise UsageError(f'--resume restores a whole run; it cannot be combined with --{pretrain[0]}')
    last = os.path.join(output_dir, 'checkpoint.pth')
    if os.path.exists(last) and not args.resume and not args.eval:
        raise UsageError(f'output dir {output_dir!r} already holds checkpoint.pth: continue with --resume {last}, '
                         'or choose a fresh --output_dir')


def make_loaders(cfg, distributed: bool):
    from datasets import BadPairError, build_dataset
    try:
        dataset_train = build_dataset('train', cfg)
        dataset_val = build_dataset('val', cfg)
    except (ValueError, KeyError, FileNotFoundError, BadPairError) as e:
        # datasets/ raises these with a message naming the file or key; here they are the user's data problem.
        raise DataError(e.args[0] if e.args else repr(e)) from None
    if len(dataset_train) < cfg.batch_size * dist.get_world_size():
        raise UsageError(f'the train split has {len(dataset_train)} image pairs, fewer than one batch of '
                         f'batch_size={cfg.batch_size} per process; lower batch_size or add data')
    if distributed:
        sampler_train = DistributedSampler(dataset_train, shuffle=True, seed=cfg.seed)
        sampler_val = DistributedSampler(dataset_val, shuffle=False)
    else:
        sampler_train = RandomSampler(dataset_train)
        sampler_val = SequentialSampler(dataset_val)
    loader_train = DataLoader(dataset_train, batch_size=cfg.batch_size, sampler=sampler_train, drop_last=True,
                              collate_fn=collate_fn, num_workers=cfg.num_workers,
                              persistent_workers=cfg.num_workers > 0)
    # Validation runs one image per batch, as in the reference (no padding between images).
    loader_val = DataLoader(dataset_val, batch_size=1, sampler=sampler_val, drop_last=False,
                            collate_fn=collate_fn, num_workers=cfg.num_workers)
    return loader_train, loader_val, sampler_train, dataset_val.coco


def coco_table(stats: list[float]) -> str:
    return '  '.join(f'{name} {100 * v:.1f}' for name, v in zip(STAT_NAMES, stats))


def prepare_demo_data(root: str) -> None:
    """Write the synthetic LLVIP-layout data set into ``root`` unless it is there already."""
    if os.path.isdir(root) and os.listdir(root):
        logger.info(f'demo: using the synthetic data set in {root}')
        return
    from datasets.synthetic import generate_synthetic_dataset
    logger.info(f'demo: generating the synthetic data set into {root}')
    generate_synthetic_dataset(root)


def run(args: argparse.Namespace) -> tuple[torch.nn.Module, dict]:
    """Everything after parsing; returns the (unwrapped) model and the last evaluation stats."""
    run_start = time.time()
    cfg = load_run_config(args)
    device = resolve_device(cfg.device)
    distributed = dist.init_distributed(device)
    if distributed and device.type == 'cuda':
        device = torch.device('cuda', torch.cuda.current_device())
    output_dir = cfg.output_dir
    check_run_options(args, output_dir)
    if args.demo and dist.is_main_process():
        setup_logger(None, dist.get_rank())
        prepare_demo_data(cfg.coco_path)
    dist.barrier()
    os.makedirs(output_dir, exist_ok=True)
    setup_logger(output_dir, dist.get_rank())
    if dist.is_main_process():
        cfg.dump(os.path.join(output_dir, 'config_cfg.py'))
    logger.info('command: ' + ' '.join(sys.argv))
    logger.info(f'config: {args.config_file}; output dir: {os.path.abspath(output_dir)}; device: {device}; '
                f'world size: {dist.get_world_size()}')
    seed_everything(cfg.seed + dist.get_rank())

    loader_train, loader_val, sampler_train, base_ds = make_loaders(cfg, distributed)
    from models import build_model
    model, criterion, postprocessors = build_model(cfg)
    model.to(device)
    criterion.to(device)
    model_without_ddp = model
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(f'number of trainable params: {n_parameters:,}')
    optimizer = torch.optim.AdamW(param_groups(model, cfg.lr, cfg.lr_backbone), lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, cfg.lr_drop)
    ema = ModelEma(model, cfg.ema_decay) if cfg.use_ema else None

    start_epoch, best_metric, best_epoch, rng_states = 0, float('-inf'), -1, None
    ckpt_kw = dict(allow_unsafe=args.allow_unsafe_checkpoint)
    if args.resume:
        state = resume_from(args.resume, model, None if args.eval else optimizer,
                            None if args.eval else lr_scheduler, ema, **ckpt_kw)
        start_epoch, best_metric, best_epoch = state['start_epoch'], state['best_metric'], state['best_epoch']
        rng_states = state['rng_state']
        logger.info(f'resumed from {args.resume}: next epoch {start_epoch}, best AP {best_metric:.4f}')
    if args.pretrain_model_coco:
        logger.info(load_pretrained_coco(model, args.pretrain_model_coco, args.finetune_ignore, **ckpt_kw).summary())
    if args.pretrain_model_path:
        logger.info(load_pretrained_caff(model, args.pretrain_model_path, args.finetune_ignore, **ckpt_kw).summary())
    if ema is not None and not args.resume:
        ema = ModelEma(model, cfg.ema_decay)  # start the average from the pretrained weights

    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == 'cuda' else None)

    if args.eval:
        stats, _ = evaluate(model, criterion, postprocessors, loader_val, base_ds, device, output_dir, cfg.amp,
                            cfg.print_freq, cfg.eval_missing_modality)
        if dist.is_main_process():
            log_line(os.path.join(output_dir, 'log.txt'),
                     {'mode': 'eval', 'checkpoint': args.resume or args.pretrain_model_path,
                      **{f'test_{k}': v for k, v in stats.items()}})
        logger.info(f'eval: {coco_table(stats["coco_eval_bbox"])}')
        logger.info(f'detections: {os.path.join(output_dir, "detections_bbox.json")}')
        return model_without_ddp, stats

    scaler = torch.amp.GradScaler('cuda') if cfg.amp and device.type == 'cuda' else None
    last_ckpt = os.path.join(output_dir, 'checkpoint.pth')
    best_ckpt = os.path.join(output_dir, 'checkpoint_best_regular.pth')
    stats: dict = {}
    if args.resume:
        if rng_states is not None and len(rng_states) == dist.get_world_size():
            restore_rng_state(rng_states[dist.get_rank()], device)  # last, so that nothing above draws from it
        else:
            saved = 'none' if rng_states is None else f'{len(rng_states)} processes'
            logger.warning(f'{args.resume} holds random generator states for {saved}, this run has '
                           f'{dist.get_world_size()}: the resumed run keeps its seeded generators, so its data order '
                           'and augmentations differ from those of an uninterrupted run')
    logger.info(f'training epochs {start_epoch}..{cfg.epochs - 1}')
    start_time = time.time()
    for epoch in range(start_epoch, cfg.epochs):
        epoch_start = time.time()
        if distributed:
            sampler_train.set_epoch(epoch)
        try:
            train_stats = train_one_epoch(model, criterion, loader_train, optimizer, device, epoch,
                                          cfg.clip_max_norm, cfg.amp, scaler,
                                          ema if epoch >= cfg.ema_epoch else None, cfg.print_freq)
        except NonFiniteLossError as e:
            kept = last_ckpt if os.path.exists(last_ckpt) else 'none (no epoch completed)'
            raise NonFiniteLossError(f'{e}. Last good checkpoint: {kept}') from None
        lr_scheduler.step()
        stats, _ = evaluate(model, criterion, postprocessors, loader_val, base_ds, device, output_dir, cfg.amp,
                            cfg.print_freq, cfg.eval_missing_modality)
        ap = stats['coco_eval_bbox'][0]
        improved = ap > best_metric
        if improved:
            best_metric, best_epoch = ap, epoch
        rng_states = dist.all_gather(capture_rng_state(device))  # every rank has its own generators
        if dist.is_main_process():
            checkpoint = {'model': model_without_ddp.state_dict(), 'optimizer': optimizer.state_dict(),
                          'lr_scheduler': lr_scheduler.state_dict(), 'epoch': epoch, 'config': cfg.to_dict(),
                          'best_metric': best_metric, 'best_epoch': best_epoch, 'rng_state': rng_states}
            if ema is not None:
                checkpoint['ema_model'] = ema.module.state_dict()
            save_checkpoint(checkpoint, last_ckpt)
            if improved:
                copy_checkpoint(last_ckpt, best_ckpt)
            if cfg.save_checkpoint_interval > 0 and (epoch + 1) % cfg.save_checkpoint_interval == 0:
                copy_checkpoint(last_ckpt, os.path.join(output_dir, f'checkpoint{epoch:04}.pth'))
            log_line(os.path.join(output_dir, 'log.txt'),
                     {**{f'train_{k}': v for k, v in train_stats.items()},
                      **{f'test_{k}': v for k, v in stats.items()},
                      'epoch': epoch, 'n_parameters': n_parameters, 'best_res': best_metric, 'best_ep': best_epoch,
                      'epoch_time': str(datetime.timedelta(seconds=int(time.time() - epoch_start))),
                      'now_time': str(datetime.datetime.now())})
        dist.barrier()
        logger.info(f'epoch {epoch}: {coco_table(stats["coco_eval_bbox"])}  (best AP {100 * best_metric:.1f} '
                    f'at epoch {best_epoch})')
    logger.info(f'training time {datetime.timedelta(seconds=int(time.time() - start_time))}, whole run '
                f'{datetime.timedelta(seconds=int(time.time() - run_start))}')
    if stats:
        logger.info(f'final (epoch {cfg.epochs - 1}): {coco_table(stats["coco_eval_bbox"])}; best AP '
                    f'{100 * best_metric:.1f} at epoch {best_epoch}')
    logger.info(f'checkpoints: {os.path.abspath(last_ckpt)}, {os.path.abspath(best_ckpt)}')
    logger.info(f'logs: {os.path.abspath(os.path.join(output_dir, "log.txt"))}, '
                f'{os.path.abspath(os.path.join(output_dir, "info.txt"))}')
    return model_without_ddp, stats


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        run(args)
    except UserError as e:
        return report_user_error(e)
    finally:
        if dist.is_dist_avail_and_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == '__main__':
    sys.exit(main())
