"""--cfg FILE.yaml: the flags of buffer.py, distill.py or eval.py from a YAML file, in DATM's format.

    python distill.py --cfg configs/mtt/cifar10_ipc10.yaml
    python distill.py --cfg configs/mtt/cifar10_ipc10.yaml --Iteration 1000 --eval_it 100   # flags win
    python distill.py --cfg DATM/configs/CIFAR-10/ConvIN/IPC10.yaml     # DATM's own files, as they are

A file is one `key: value` line per flag, the key named as the flag (`ipc: 10`, `zca: True`,
`lr_lr: 1e-5`). Its values become the flags' defaults, so a flag given on the command line wins.
Every key is applied, or ignored with its reason in one printed line (DATM's wandb `project`, its
GPU list `device: [3]`, ...); any other key, or a value of the wrong type, is an error naming the
key. Numbers may be written as 1e-5, which PyYAML reads as text.
"""
import argparse

import yaml


class ConfigError(Exception):
    """What is wrong with the file, in one line (utils.parse prefixes the file's name)."""


def _gpu_list(value):
    if isinstance(value, list):
        return f"DATM's GPUs {value} for CUDA_VISIBLE_DEVICES; here --device cuda:N, or torchrun for several"
    return None  # a device name such as cuda:1 is the --device flag


def _label_model(value):
    if value:
        raise ConfigError("Initialize_Label_With_Another_Model: True (labels from a model other than the experts) "
                          "is not supported here")
    return "False: the experts label the images, as here"


# Keys that are not flags here but that DATM's files hold: value -> why the key is ignored (None: it
# is a flag after all).
IGNORED = {
    "project": lambda value: "DATM's wandb project (no wandb here: log.jsonl holds the curves)",
    "device": _gpu_list,
    "record_loss": lambda value: "DATM.py reads it nowhere",
    "parall_eva": lambda value: "DATM's evaluation on several GPUs (here torchrun spreads the evaluations)",
    "Initialize_Label_With_Another_Model": _label_model,
    "Initialize_Label_Model": lambda value: "read only with Initialize_Label_With_Another_Model: True",
    "Initialize_Label_Model_Dir": lambda value: "read only with Initialize_Label_With_Another_Model: True",
    "experts": lambda value: "the buffer.py --cfg file of the experts this row distills from",
    "published": lambda value: "the paper's result, which published.py compares with yours",
}
# DATM's older names of two flags, which some of its files still use.
RENAMED = {"Initial_Step": "current_max_start_epoch", "learn_end_epoch": "expansion_end_epoch"}

KINDS = {  # the Python type a flag parses to -> (what the file must hold, the test)
    bool: ("True or False", lambda v: isinstance(v, bool)),
    int: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    float: ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) or is_number(v)),
    str: ("a string", lambda v: isinstance(v, str)),
}


def is_number(text):
    """Text that float() reads: PyYAML reads 1e-5 (no dot) as a string."""
    if not isinstance(text, str):
        return False
    try:
        float(text)
    except ValueError:
        return False
    return True


def cfg_path(argv):
    """The FILE of `--cfg FILE` (or --cfg=FILE) in argv; None without one. argparse checks the rest."""
    for i, arg in enumerate(argv):
        if arg == "--cfg" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--cfg="):
            return arg.split("=", 1)[1]
    return None


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice is an error rather than the last one winning."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
        repeated = sorted({str(key) for key in keys if keys.count(key) > 1})
        if repeated:
            raise ConfigError(f"{', '.join(repeated)} given more than once (line {node.start_mark.line + 1})")
        return super().construct_mapping(node, deep)


def read(path):
    """The file's mapping of keys to values, DATM's older names renamed."""
    try:
        with open(path) as f:
            values = yaml.load(f, Loader=UniqueKeyLoader)
    except OSError as err:
        raise ConfigError(f"cannot read it ({err.strerror})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"not valid YAML: {' '.join(problem.split())}{where}") from None
    if not isinstance(values, dict) or not values:
        raise ConfigError(f"holds {type(values).__name__ if values is not None else 'nothing'}, "
                          f"not `flag: value` lines")
    for old, new in RENAMED.items():
        if old in values and new in values:
            raise ConfigError(f"both {new} and {old} (DATM's older name for it) are given")
    return {RENAMED.get(key, key): value for key, value in values.items()}


def flag_value(action, key, value):
    """`value` from the file as the flag `action` would parse it, or a ConfigError naming the key."""
    if value is None and action.default is None:
        return None
    if isinstance(action.default, list):  # a repeatable flag (eval.py's --baseline): a list of its values
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list such as [{', '.join(action.choices or ['...'])}], got {value!r}")
        return [one_value(action, key, item) for item in value]
    return one_value(action, key, value)


def one_value(action, key, value):
    kind = getattr(action.type, "kind", action.type if action.type in KINDS else str)
    wanted, test = KINDS[kind]
    if not test(value):
        raise ConfigError(f"{key}: expected {wanted}, got {type(value).__name__} {value!r}")
    try:
        parsed = action.type(str(value)) if action.type else value
    except (argparse.ArgumentTypeError, ValueError) as err:
        raise ConfigError(f"{key}: {err}") from None
    if action.choices is not None and parsed not in action.choices:
        raise ConfigError(f"{key}: {parsed!r} is not one of {', '.join(map(str, action.choices))}")
    return parsed


def apply(parser, path, ignore=lambda values: {}):
    """Make the file's values the parser's defaults; {key: why} of the keys ignored. `ignore(values)`
    adds the keys a script ignores given the whole file (distill.py: a DATM file's ema_decay)."""
    values = read(path)
    flags = {action.dest: action for action in parser._actions if action.option_strings and action.dest != "help"}
    ignored_here, ignored, defaults = ignore(values), {}, {}
    for key, value in values.items():
        why = ignored_here.get(key) or IGNORED.get(key, lambda value: None)(value)
        if key == "cfg":
            raise ConfigError("cfg: a --cfg file cannot name another; give both flags' values in one file")
        if why:
            ignored[key] = why
        elif key in flags:
            defaults[key] = flag_value(flags[key], key, value)
        else:
            raise ConfigError(f"unknown key {key}: no such flag here (--help lists the flags)")
    parser.set_defaults(**defaults)
    return ignored
