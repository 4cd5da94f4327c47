"""``nnunet_transfer lora merge|info``: one base checkpoint, many small per-target adapter files."""
from __future__ import annotations

from nnunet_transfer.cli import add_trust_argument


def add_parser(sub) -> None:
    p = sub.add_parser("lora", help="merge a LoRA adapter file into a base checkpoint; show an adapter file",
                       description="nnUNetTrainerLoRA writes lora_adapters.pth (adapters, trained heads, digests of "
                                   "the frozen base, the run's plans) next to checkpoint_final.pth.")
    ps = p.add_subparsers(dest="lora_command", metavar="ACTION")
    ps.required = True
    m = ps.add_parser(
        "merge", help="write a full nnU-Net checkpoint: base + (alpha/r)·B·A, with the trained heads",
        description="Build the network of the adapter file's plans, load BASE (the checkpoint the LoRA run "
                    "started from: its -pretrained_weights file, or its start_weights.pth), add the adapters "
                    "and write the merged weights as an nnU-Net checkpoint (network_weights, trainer_name, "
                    "init_args): what checkpoint_final.pth of the run holds. nnUNetv2_predict -chk reads it "
                    "from a fold folder of the run's model folder; -pretrained_weights accepts it. A BASE whose "
                    "frozen tensors differ from the ones the adapters were trained on is refused.")
    m.add_argument("adapters", metavar="ADAPTER", help="lora_adapters.pth of a nnUNetTrainerLoRA run")
    m.add_argument("base", metavar="BASE", help="base checkpoint (.pth, or a fold folder holding checkpoint_final.pth)")
    m.add_argument("-o", dest="output", required=True, metavar="OUT", help="output checkpoint")
    m.add_argument("--force", action="store_true", help="replace an existing output file")
    add_trust_argument(m)
    m.set_defaults(func=run_merge)
    i = ps.add_parser("info", help="rank, alpha, adapted convolutions and sizes of an adapter file")
    i.add_argument("adapters", metavar="ADAPTER", help="lora_adapters.pth")
    add_trust_argument(i)
    i.set_defaults(func=run_info)


def run_merge(args) -> int:
    from nnunet_transfer.trainers.lora import merge_adapters

    out = merge_adapters(args.adapters, args.base, args.output, force=args.force)
    print(f"wrote {out}")
    return 0


def run_info(args) -> int:
    import os

    from nnunet_transfer.trainers.lora import read_adapter_file

    payload = read_adapter_file(args.adapters)
    n_adapt = sum(t.numel() for a in payload["adapters"].values() for t in a.values())
    n_trained = sum(t.numel() for t in payload["trained"].values())
    print(f"{args.adapters}: {os.path.getsize(args.adapters):,} bytes, trainer {payload['trainer_name']}, "
          f"configuration {payload['init_args'].get('configuration')}, epoch {payload['current_epoch']}")
    print(f"rank {payload['rank']}, alpha {payload['alpha']}: {len(payload['adapters'])} adapted convolutions, "
          f"{n_adapt:,} adapter parameters; {len(payload['trained'])} tensors trained in full ({n_trained:,} "
          f"parameters); base: {payload.get('base_source')} ({len(payload['base_digests'])} frozen tensors checked "
          f"at merge)")
    return 0
