"""The scripts' flags: those buffer.py, distill.py and eval.py share, the checked types of all, and --cfg FILE.yaml.

    python distill.py --cfg configs/mtt/cifar10_ipc10.yaml
    python distill.py --cfg configs/mtt/cifar10_ipc10.yaml --Iteration 1000 --eval_it 100   # flags win
    python distill.py --cfg DATM/configs/CIFAR-10/ConvIN/IPC10.yaml     # DATM's own files, as they are

A --cfg file (DATM's format; read with PyYAML) is one `key: value` line per flag, named as the flag (`ipc: 10`,
`zca: True`, `lr_lr: 1e-5`). argparse parses each value as it would the command line's (as DATM's loader hands them to
argparse) into the flags' defaults, so a flag given on the command line wins. Every key is applied, or ignored with its
reason in one printed line (DATM's wandb `project`, its GPU list `device: [3]`, ...); any other key is an error."""
import argparse
import sys

import torch

from mtt.augment import DSA_GROUPS, DSA_STRATEGY, strategy_groups
from mtt.data import DATASETS, IMAGENET_SUBSETS
from networks import MODELS, get_network
from utils import TORCH_SEEDS, UsageError, say


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and every flag's default in --help (unless its help says it)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        return f"{text} (default: {'none' if action.default is None else action.default})".lstrip()


class Parser(argparse.ArgumentParser):
    def __init__(self, description):
        super().__init__(description=description, formatter_class=HelpFormatter)

    def error(self, message):
        raise UsageError(message)


def checked(kind, test, requirement):
    """An argparse type: the text as `kind`, refused unless test(value) holds."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {requirement}, not {text!r}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, not {text}")
        return value
    return parse


# Every number has a range the machine represents: counts that index a tensor (int32 covers any the
# memory holds), rates and sizes a float32 tensor holds (a larger one overflows in the first update).
COUNT_MAX = 2**31 - 1
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
positive_int = checked(int, lambda v: 1 <= v <= COUNT_MAX, "an integer from 1 to 2^31-1")
non_negative_int = checked(int, lambda v: 0 <= v <= COUNT_MAX, "an integer from 0 to 2^31-1")
positive_float = checked(float, lambda v: 0 < v <= FLOAT32_MAX, "a positive number up to 3.4e38 (float32's largest)")
non_negative_float = checked(float, lambda v: 0 <= v <= FLOAT32_MAX, "a number from 0 to 3.4e38 (float32's largest)")
fraction = checked(float, lambda v: 0 < v < 1, "in (0, 1)")
seed_value = checked(int, lambda v: 0 <= v < TORCH_SEEDS, "in 0..2^63-1")
BOOLEANS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}


def boolean(text):
    """--flag True / --flag False (the original's spelling; also true/false, 1/0, yes/no)."""
    if str(text).lower() not in BOOLEANS:
        raise argparse.ArgumentTypeError(f"expected True or False, not {text!r}")
    return BOOLEANS[str(text).lower()]


def folder_path(text):
    """A path to write to or read from: an empty one would mean the current folder, unasked."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path (it would mean the current folder); give a folder")
    return text


def dsa_strategy(text):
    try:
        strategy_groups(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def switch(parser, name, help, default=False):
    """A boolean flag: --name alone means True, and --name True / --name False say which."""
    parser.add_argument(name, nargs="?", const=True, default=default, type=boolean, metavar="{True,False}", help=help)


def add_common_args(parser, from_set=False):
    """The flags buffer.py, distill.py and eval.py share, with the original's names and defaults; from_set (eval.py):
    those that describe the set default to its run.json's (None until read)."""
    default = lambda value: None if from_set else value
    of_set = " (default: the set's run.json, else {})".format if from_set else lambda value: ""
    parser.add_argument("--dataset", default=default("CIFAR10"), choices=list(DATASETS),
                        help="FashionMNIST-mini is shipped in assets/ (no download); MNIST, FashionMNIST, SVHN, "
                             "CIFAR10 and CIFAR100 are downloaded into --data_path; Tiny and ImageNet are read from it"
                        + of_set("CIFAR10"))
    parser.add_argument("--subset", default=default("imagenette"), choices=list(IMAGENET_SUBSETS),
                        help="ImageNet subset (with --dataset ImageNet)" + of_set("imagenette"))
    parser.add_argument("--model", default=default("ConvNet"), choices=list(MODELS), metavar="MODEL",
                        help=f"network: {', '.join(MODELS)}" + of_set("ConvNet"))
    parser.add_argument("--res", type=positive_int, default=default(128),
                        help="image side of ImageNet subsets, squashed to res x res as the original does" + of_set(128))
    parser.add_argument("--data_path", default="data", type=folder_path, help="where datasets are found or downloaded")
    switch(parser, "--zca", "ZCA-whiten the data (eps 0.1, fitted on the training set)" + of_set(False),
           default=default(False))
    switch(parser, "--dsa", "differentiable Siamese augmentation on every batch", default=True)
    parser.add_argument("--dsa_strategy", default=DSA_STRATEGY, type=dsa_strategy,
                        help=f"DSA groups joined by _, one drawn per batch (from {', '.join(DSA_GROUPS)})")
    parser.add_argument("--batch_train", type=positive_int, default=256, help="batch size for training networks")
    parser.add_argument("--seed", type=seed_value, default=0, help="seeds python, numpy and torch")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when present)")
    switch(parser, "--deterministic", "deterministic CUDA kernels (bit-identical CUDA runs, somewhat slower)")
    switch(parser, "--tf32", "TensorFloat-32 in CUDA convolutions and matmuls, as the original's torch 1.11 ran them; "
                             "False: full float32 (README: Precision)", default=True)
    parser.add_argument("--cfg", metavar="FILE.yaml", help="flags from a YAML file, one `flag: value` line each "
                        "(DATM's format; its files load as they are); flags given here win (mtt/flags.py)")
    return parser


def parse(parser, argv, ignore=lambda values: {}):
    """The flags, after those of a --cfg file (`ignore(values)`: the keys a script ignores given the whole file, with
    why), with `augmentation` resolved once: the DSA strategy, or None without --dsa."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if (path := cfg_path(argv)) is not None:
        try:
            ignored = apply_cfg(parser, path, ignore)
        except UsageError as err:
            raise UsageError(f"--cfg {path}: {err}") from None
        if ignored:
            say(f"--cfg {path}: ignored " + "; ".join(f"{key}: {why}" for key, why in ignored.items()))
    args = parser.parse_args(argv)
    args.augmentation = args.dsa_strategy if args.dsa else None
    return args


def take_defaults(args, defaults, otherwise, active, said):
    """A method's defaults ({flag: value}) for the flags left at None when `active`, else `otherwise`'s values (the
    plain method's; a flag missing there takes the method's too). The ones taken are printed after `said` and kept in
    args.method_defaults (run.json, buffer.json)."""
    args.method_defaults = {}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value if active else otherwise.get(name, value))
            if active:
                args.method_defaults[name] = value
    if args.method_defaults:
        say(f"{said}: " + " ".join(f"--{name} {value}" for name, value in args.method_defaults.items())
            + "; give a flag to change one")


def check_model(model, dataset, res):
    """The network's parameter count, checked to build for the dataset's images (deep ConvNets pool small ones away)."""
    channel, im_size, num_classes = DATASETS[dataset].shape(res)
    try:
        with torch.device("meta"):  # shapes only, no memory
            return sum(p.numel() for p in get_network(model, channel, num_classes, im_size).parameters())
    except (ValueError, RuntimeError) as err:
        raise UsageError(f"--model {model} does not fit {dataset}'s {im_size[0]}x{im_size[1]} images: "
                         f"{str(err).splitlines()[0]}") from None


# --- --cfg FILE.yaml ---------------------------------------------------------------------------
def _label_model(value):
    if value:
        raise UsageError("Initialize_Label_With_Another_Model: True (labels from a model other than the experts) "
                         "is not supported here")
    return "False: the experts label the images, as here"


# Keys of DATM's files that are not flags here: value -> why the key is ignored (None: it is a flag after all).
IGNORED = {
    "project": lambda value: "DATM's wandb project (no wandb here: log.jsonl holds the curves)",
    "device": lambda value: (f"DATM's GPUs {value} for CUDA_VISIBLE_DEVICES; here --device cuda:N, or torchrun for "
                             "several") if isinstance(value, list) else None,  # a name such as cuda:1 is --device
    "record_loss": lambda value: "DATM.py reads it nowhere",
    "parall_eva": lambda value: "DATM's evaluation on several GPUs (here torchrun spreads the evaluations)",
    "Initialize_Label_With_Another_Model": _label_model,
    "Initialize_Label_Model": lambda value: "read only with Initialize_Label_With_Another_Model: True",
    "Initialize_Label_Model_Dir": lambda value: "read only with Initialize_Label_With_Another_Model: True",
    "experts": lambda value: "the buffer.py --cfg file of the experts this row distills from",
    "published": lambda value: "the paper's result, which tools/published.py compares with yours",
}
# DATM's older names of two flags, which some of its files still use.
RENAMED = {"Initial_Step": "current_max_start_epoch", "learn_end_epoch": "expansion_end_epoch"}


def cfg_path(argv):
    """The FILE of `--cfg FILE` (or --cfg=FILE) in argv; None without one. argparse checks the rest."""
    for i, arg in enumerate(argv):
        if arg == "--cfg" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--cfg="):
            return arg.split("=", 1)[1]
    return None


def read_cfg(path):
    """The file's keys and values, DATM's older names renamed; a key given twice is an error, not a silent override."""
    try:
        import yaml  # optional: only --cfg needs it
    except ModuleNotFoundError:
        raise UsageError("reading a config file needs PyYAML: pip install pyyaml") from None
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        values = yaml.safe_load(text)
    except OSError as err:
        raise UsageError(f"cannot read it ({err.strerror})") from None
    except UnicodeDecodeError:
        raise UsageError("cannot read it as text (a binary file?)") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise UsageError(f"not valid YAML: {' '.join(problem.split())}{where}") from None
    if not isinstance(values, dict) or not values:
        raise UsageError(f"holds {type(values).__name__ if values is not None else 'nothing'}, not `flag: value` lines")
    keys = [key.value for key, _ in node.value]
    if repeated := sorted({key for key in keys if keys.count(key) > 1}):
        raise UsageError(f"{', '.join(repeated)} given more than once (line {node.start_mark.line + 1})")
    for old, new in RENAMED.items():
        if old in values and new in values:
            raise UsageError(f"both {new} and {old} (DATM's older name for it) are given")
    return {RENAMED.get(key, key): value for key, value in values.items()}


def apply_cfg(parser, path, ignore):
    """Make the file's values the parser's defaults, parsed by argparse as the same flags on the command line (a list is
    a repeated flag, eval.py's --baseline; null is the flag's default); {key: why} of the keys ignored."""
    values = read_cfg(path)
    actions = {action.dest: action for action in parser._actions if action.option_strings and action.dest != "help"}
    ignored_here, ignored, argv = ignore(values), {}, []
    for key, value in values.items():
        if key == "cfg":
            raise UsageError("cfg: a --cfg file cannot name another; give both flags' values in one file")
        if why := ignored_here.get(key) or IGNORED.get(key, lambda value: None)(value):
            ignored[key] = why
            continue
        if key not in actions:
            raise UsageError(f"unknown key {key}: no such flag here (--help lists the flags)")
        repeated = isinstance(actions[key].default, list)
        if isinstance(value, list) != repeated:
            raise UsageError(f"{key}: expected {'a list' if repeated else 'one value'}, got {value!r}")
        argv += [f"--{key}={item}" for item in (value if repeated else [] if value is None else [value])]
    from_file = parser.parse_args(argv)
    parser.set_defaults(**{key: getattr(from_file, key) for key in values if key in actions})
    return ignored
