"""nnU-Net v2's training and prediction through its Python API, with the budget trainer
(``python bench/nnunet_ext/run.py train|predict …``, called by ``bench/peers_nnunet.py``).

Its command-line tools find a trainer by importing every module of its trainer package, among
them the Primus trainers (timm → torchvision); torchvision's PyPI wheel for torch 2.13 is built
against CUDA torch and does not import beside the CPU build. So the trainer class is handed over
directly, as nnU-Net's API allows: training builds ``nnUNetTrainerBudget`` itself (as
``nnUNetv2_train`` does, thread settings included, without its final full validation), and the
predictor's trainer lookup returns that class (``nnUNetv2_predict``'s settings otherwise).
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
from os.path import join
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nnUNetTrainerBudget import nnUNetTrainerBudget  # noqa: E402


def _threads(device: torch.device) -> None:
    """nnUNetv2_train's own settings."""
    if torch.cuda.is_available():
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True
    if device.type == "cpu":
        torch.set_num_threads(multiprocessing.cpu_count())
    else:
        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)


def train(dataset: str, fold: str, device: torch.device) -> None:
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    folder = join(nnUNet_preprocessed, maybe_convert_to_dataset_name(dataset))
    plans, dataset_json = load_json(join(folder, "nnUNetPlans.json")), load_json(join(folder, "dataset.json"))
    plans["continue_training"] = False  # as nnUNetv2_train without --c: a fresh training
    trainer = nnUNetTrainerBudget(plans, "2d", fold if fold == "all" else int(fold), dataset_json, device=device)
    trainer.run_training()


def predict(model: str, fold: str, images: str, out: str, checkpoint: str, mirror: bool,
            device: torch.device) -> None:
    from nnunetv2.inference import predict_from_raw_data as pfr

    pfr.recursive_find_trainer_class_by_name = lambda name: nnUNetTrainerBudget  # see the module docstring
    predictor = pfr.nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirror,
                                    perform_everything_on_device=True, device=device, verbose=False,
                                    verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(model, use_folds=(fold,), checkpoint_name=checkpoint)
    predictor.predict_from_files(images, out, save_probabilities=False, overwrite=True,
                                 num_processes_preprocessing=1, num_processes_segmentation_export=1)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("dataset")
    t.add_argument("fold")
    p = sub.add_parser("predict")
    p.add_argument("model", help="the trainer/plans/configuration folder (fold_* inside)")
    p.add_argument("fold")
    p.add_argument("images")
    p.add_argument("out")
    p.add_argument("--checkpoint", default="checkpoint_final.pth")
    p.add_argument("--mirror", action="store_true")
    for s in (t, p):
        s.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    _threads(device)
    if args.cmd == "train":
        train(args.dataset, args.fold, device)
    else:
        predict(args.model, args.fold, args.images, args.out, args.checkpoint, args.mirror, device)


if __name__ == "__main__":
    main()
