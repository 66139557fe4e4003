"""The package behind buffer.py, distill.py and eval.py, one module per step of the data's way:
flags -> data (cache, augment) -> training -> trajectories -> matching -> run_folder -> evaluation,
with parallel and progress for every script. README.md, "How the code is laid out", says what each holds."""
