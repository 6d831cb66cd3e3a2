"""Trajectory modelling with an energy over transitions (IGEBM section 4.6), against regression.

    python -m trainers.trajectories --model_dir runs/particles

Simulates the bouncing-particles system (`keras_jem.data.particles`), trains a
`keras_jem.models.TransitionEBM` and a feed-forward regression baseline of the same size on its
transitions, rolls both out from new initial states far beyond the training horizon, and reports
the Frechet distance between the predicted and the true state distributions at each horizon
(Gaussians fitted to the states of all roll-outs, as FID does with features). Writes
`trajectories.json`, `trajectories.md` and `rollout.png` (one roll-out drawn as particle paths).
"""

import argparse
import json
import os
import sys
import time


def _positive_ints(text):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers such as 1,10,50,100; received {text!r}"
        )
    return values


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m trainers.trajectories",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--model_dir", default="runs/particles", help="where the report and picture go")
    add("--num_particles", type=int, default=2, help="balls in the box")
    add("--num_trajectories", type=int, default=2000, help="training trajectories")
    add("--train_steps", type=int, default=20, help="steps per training trajectory")
    add("--horizons", type=_positive_ints, default=[1, 10, 50, 100],
        help="roll-out horizons to score")
    add("--num_eval", type=int, default=500, help="new initial states rolled out for scoring")
    add("--epochs", type=int, default=5, help="training epochs of each model")
    add("--batch_size", type=int, default=256, help="training batch size")
    add("--learning_rate", type=float, default=1e-3, help="Adam learning rate of both models")
    add("--hidden_units", type=int, default=256, help="width of both models' two hidden layers")
    add("--langevin_steps", type=int, default=20, help="Langevin steps per predicted state")
    add("--step_size", type=float, default=0.2, help="Langevin step size (chain units)")
    add("--langevin_noise", type=float, default=0.01,
        help="Langevin noise per step of the training chains (chain units)")
    add("--prediction_noise", type=float, default=0.0,
        help="Langevin noise per step of the roll-out chains (0: noise-free descent to the "
             "energy's minimum)")
    add("--init_noise", type=float, default=1.0,
        help="spread of the training chains' start (chain units; roll-out chains start "
             "without noise)")
    add("--parameterization", choices=("step", "state"), default="step",
        help="the chain's coordinates: the robustly standardised change of state or the "
             "standardised next state (see TransitionEBM)")
    add("--clip_to_box", action=argparse.BooleanOptionalAction, default=False,
        help="clip predicted positions to the box (the in-box share is then 100%% by design)")
    add("--seed", type=int, default=1, help="seed of the data, the models and the roll-outs")
    return parser


def validate(args):
    problems = []
    for name in ("num_particles", "num_trajectories", "train_steps", "num_eval", "epochs",
                 "batch_size", "hidden_units"):
        if getattr(args, name) < 1:
            problems.append(f"--{name} must be at least 1 (received {getattr(args, name)})")
    for name in ("step_size", "langevin_noise", "prediction_noise", "init_noise"):
        if getattr(args, name) < 0:
            problems.append(f"--{name} must be >= 0 (received {getattr(args, name)})")
    if args.langevin_steps < 0:
        problems.append(f"--langevin_steps must be >= 0 (received {args.langevin_steps})")
    if not args.learning_rate > 0:
        problems.append(f"--learning_rate must be positive (received {args.learning_rate})")
    return problems


def regression_baseline(state_dim, hidden_units, normalizer):
    """An MLP predicting the standardised change of state, the EBM's size and activations."""
    import keras

    inputs = keras.Input((state_dim,))
    z = normalizer(inputs)
    hidden = keras.layers.Dense(hidden_units, activation="swish")(z)
    hidden = keras.layers.Dense(hidden_units, activation="swish")(hidden)
    delta = keras.layers.Dense(state_dim)(hidden)
    scale = keras.ops.sqrt(normalizer.variance + 1e-12)
    return keras.Model(inputs, inputs + delta * scale, name="regression")


def regression_rollout(model, states, num_steps):
    import numpy as np

    path = [np.asarray(states, np.float32)]
    for _ in range(num_steps):
        path.append(model.predict_on_batch(path[-1]))
    return np.stack(path, axis=1)


def frechet_by_horizon(true_paths, predicted_paths, horizons):
    """Frechet distance between Gaussians fitted to the true and predicted states at each h."""
    from keras_jem.metrics import generative

    return {
        int(h): float(generative.fid_from_activations(true_paths[:, h], predicted_paths[:, h]))
        for h in horizons
    }


def draw_rollout(path, true_path, ebm_path, regression_path, num_particles):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(10.5, 3.6))
    for axis, (title, states) in zip(axes, (
        ("simulator", true_path), ("energy model", ebm_path), ("regression", regression_path)
    )):
        for k in range(num_particles):
            axis.plot(states[:, 4 * k], states[:, 4 * k + 1], lw=1)
            axis.plot(states[0, 4 * k], states[0, 4 * k + 1], "ko", ms=3)
        axis.set(xlim=(0, 1), ylim=(0, 1), title=title, aspect="equal", xticks=[], yticks=[])
    figure.suptitle(f"{len(true_path) - 1}-step roll-out from one initial state")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def run(args):
    import keras
    import numpy as np

    from keras_jem.data import particles
    from keras_jem.models.transition_ebm import TransitionEBM
    from keras_jem.models.transition_ebm import default_energy_network
    from keras_jem.sampling import SGLD

    os.makedirs(args.model_dir, exist_ok=True)
    keras.utils.set_random_seed(args.seed)
    system = particles.BouncingParticles(num_particles=args.num_particles)
    s_t, s_next = particles.transitions(
        system.simulate(args.num_trajectories, args.train_steps, seed=args.seed)
    )
    print(f"[trajectories] {len(s_t)} transitions of {system.state_dim}-d states", flush=True)
    results = {"config": vars(args), "system": system.get_config()}

    def sgld(noise_scale):
        return SGLD(num_steps=args.langevin_steps, step_size=args.step_size,
                    noise_scale=noise_scale, gradient_clip=1.0)

    ebm = TransitionEBM(
        state_dim=system.state_dim,
        energy_network=default_energy_network((args.hidden_units,) * 2),
        sampler=sgld(args.langevin_noise),
        prediction_sampler=sgld(args.prediction_noise),
        init_noise=args.init_noise,
        parameterization=args.parameterization,
        state_range=system.state_range() if args.clip_to_box else None,
        seed=args.seed,
    )
    ebm.adapt(s_t, s_next)
    ebm.compile(optimizer=keras.optimizers.Adam(args.learning_rate))
    start = time.time()
    ebm.fit(s_t, s_next, batch_size=args.batch_size, epochs=args.epochs, verbose=2)
    results["ebm_train_seconds"] = time.time() - start

    baseline = regression_baseline(system.state_dim, args.hidden_units, ebm.normalizer)
    baseline.compile(optimizer=keras.optimizers.Adam(args.learning_rate), loss="mse")
    start = time.time()
    baseline.fit(s_t, s_next, batch_size=args.batch_size, epochs=args.epochs, verbose=2)
    results["regression_train_seconds"] = time.time() - start

    horizon = max(args.horizons)
    rng = np.random.default_rng(args.seed + 1)
    start_states = system.initial_states(args.num_eval, rng)
    true_paths = system.rollout(start_states, horizon, seed=args.seed + 2)
    ebm_paths = ebm.rollout(start_states, horizon, seed=args.seed + 3)
    regression_paths = regression_rollout(baseline, start_states, horizon)
    results["frechet"] = {
        "energy_model": frechet_by_horizon(true_paths, ebm_paths, args.horizons),
        "regression": frechet_by_horizon(true_paths, regression_paths, args.horizons),
    }
    low, high = system.radius, 1 - system.radius

    def in_box(paths):
        positions = paths.reshape(*paths.shape[:2], -1, 4)[..., :2]
        return float(np.mean((positions >= low - 0.02) & (positions <= high + 0.02)))

    results["fraction_in_box"] = {
        "energy_model": in_box(ebm_paths), "regression": in_box(regression_paths)}
    draw_rollout(os.path.join(args.model_dir, "rollout.png"), true_paths[0], ebm_paths[0],
                 regression_paths[0], args.num_particles)
    lines = [
        "| model | " + " | ".join(f"FD @ {h}" for h in args.horizons) + " | positions in box |",
        "|---|" + "---|" * len(args.horizons) + "---|",
    ]
    for name in ("energy_model", "regression"):
        cells = " | ".join(f"{results['frechet'][name][h]:.4f}" for h in args.horizons)
        lines.append(f"| {name} | {cells} | {results['fraction_in_box'][name]:.1%} |")
    table = "\n".join(lines)
    with open(os.path.join(args.model_dir, "trajectories.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.model_dir, "trajectories.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(table, flush=True)
    return results


def main(argv=None):
    args = build_parser().parse_args(argv)
    problems = validate(args)
    if problems:
        sys.exit("trainers.trajectories: " + "; ".join(problems))
    run(args)


if __name__ == "__main__":
    main()
