"""Names and defaults that the command line offers, in a module that imports nothing.

``autoseg --help`` builds every subcommand's parser, choice lists included; reading those lists
from the modules that use them would import torch, pydantic or scipy first (seconds instead of a
tenth of one). ``tests/test_cli.py`` checks each list against the library's own registry, so a
name added there and not here fails a test rather than going missing from the command line.
"""

from __future__ import annotations

# the configurations, in the order the planner writes them (autoseg.plan uses this tuple)
CONFIGURATION_NAMES = ("2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres")

# the planner's presets (autoseg.planning.PRESETS): nnU-Net's residual-encoder sizes for 8, 24 and
# 40 GB, and a small U-Net for machines without a GPU
PLAN_PRESET_NAMES = ("resenc-m", "resenc-l", "resenc-xl", "cpu")

# the architectures autoseg.networks registers itself (plugins may register more in-process)
NETWORK_NAMES = ("attention_unet", "resenc", "unet", "unetpp", "vnet")

# the losses autoseg.training.losses builds (it uses this tuple)
LOSS_NAMES = ("dice_ce", "dice", "ce", "focal", "dice_focal")

# autoseg.training.augment.PRESETS
AUGMENTATION_PRESET_NAMES = ("default", "medical", "light", "none")

# autoseg.examples.EXAMPLE_KINDS
EXAMPLE_KIND_NAMES = ("ct", "mri", "2d", "xray")

# autoseg evaluate
DEFAULT_TOLERANCE_MM = 1.0
DEFAULT_FILE_ENDING = ".nii.gz"

# autoseg.precision: autocast precision and torch.compile choices of train and predict
PRECISION_CHOICES = ("auto", "fp32", "bf16", "fp16")
COMPILE_CHOICES = ("auto", "on", "off")

# autoseg predict --runtime (autoseg.inference.runtimes.RUNTIMES) and autoseg export-model --format
# (autoseg.inference.export.EXPORT_FORMATS)
RUNTIME_NAMES = ("torch", "onnx", "torchscript")
EXPORT_FORMAT_NAMES = ("zip", "onnx", "torchscript")

# autoseg predict --output-format: label maps in the input's own format (nifti: the dataset's file
# ending), or a DICOM Segmentation per DICOM series input (autoseg.dicom)
OUTPUT_FORMAT_NAMES = ("nifti", "dicom-seg")
