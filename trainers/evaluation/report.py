"""The report writer: `eval.json` (every number and setting) and `report.md` (readable, with
the figures)."""

import json
import os


def _json_default(value):
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def write_outputs(report, output_dir):
    os.makedirs(output_dir, exist_ok=True)
    json_path = os.path.join(output_dir, "eval.json")
    with open(json_path + ".tmp", "w") as f:
        json.dump(report, f, indent=2, default=_json_default)
    os.replace(json_path + ".tmp", json_path)
    with open(os.path.join(output_dir, "report.md"), "w") as f:
        f.write(render_markdown(report))
    return json_path


def _fmt(value, percent=False, digits=4):
    if value is None:
        return "n/a"
    if isinstance(value, (int, float)):
        return f"{100 * value:.2f}%" if percent else f"{value:.{digits}g}"
    return str(value)


def render_markdown(report):
    lines = [
        f"# Evaluation of `{report['model_dir']}`",
        "",
        f"- model: `{report.get('model')}`, dataset: `{report.get('dataset')}`",
        f"- command: `{report['command']}`",
        f"- started {report['started']}" + (f", finished {report['finished']}"
                                            if report.get("finished") else " (running)"),
        "",
    ]
    for name, task in report["tasks"].items():
        lines += [f"## {name}", "", f"status: **{task['status']}**"
                  + (f" ({task['seconds']:.1f} s)" if "seconds" in task else ""), ""]
        if task.get("reason"):
            lines += [f"reason: {task['reason']}", ""]
        if task.get("error"):
            lines += ["error:", "", "```", str(task["error"]), "```", ""]
        results = task.get("results") or {}
        if name == "accuracy" and results:
            lines += [(f"- accuracy: **{_fmt(results['accuracy'], True)}** on "
                       f"{results['num_examples']} images"), f"- loss: {_fmt(results['loss'])}", ""]
        if name == "calibration" and results:
            lines += [f"- ECE ({results['num_bins']} bins): **{_fmt(results['ece'], True)}**", ""]
        if name == "ood" and results:
            sets = list(task["settings"]["ood_sets"])
            lines += ["AUROC (FPR at 95% TPR):", "",
                      "| score | " + " | ".join(sets) + " |",
                      "|---|" + "---|" * len(sets)]
            for score, per_set in results.items():
                cells = [f"{per_set[s]['auroc']:.3f} ({per_set[s]['fpr_at_95_tpr']:.3f})"
                         if s in per_set else "n/a" for s in sets]
                lines.append(f"| {score} | " + " | ".join(cells) + " |")
            lines.append("")
        if name == "robustness" and results:
            for norm, curve in results.items():
                lines += [(f"{curve.get('label', norm)}: PGD-{curve['num_steps']} on "
                           f"{curve['num_examples']} images"), "",
                          "| epsilon ([0, 1] pixel scale) | robust accuracy | per-epsilon |",
                          "|---|---|---|"]
                for eps, acc, raw in zip(curve["epsilons"], curve["accuracy"],
                                         curve["per_epsilon_accuracy"]):
                    shown = f"{eps * 255:.3g}/255" if norm == "linf" else f"{eps:.3g}"
                    lines.append(f"| {shown} | {_fmt(acc, True)} | {_fmt(raw, True)} |")
                lines.append("")
        if name == "generation" and results:
            for key in ("replay_buffer_top_k", "fresh_samples"):
                entry = results.get(key)
                if not entry:
                    continue
                if key == "fresh_samples":
                    lines.append(f"- fresh samples ({entry['num_images']}): IS "
                                 f"{_fmt(entry['inception_score'])}, FID {_fmt(entry['fid'])} "
                                 f"({entry['extractor']})")
                else:
                    lines.append(
                        f"- replay buffer top-k: IS {_fmt(entry['inception_score']['value'])} "
                        f"(top {entry['inception_score']['top_k']}), FID "
                        f"{_fmt(entry['fid']['value'])} (top {entry['fid']['top_k']})")
            for key, reason in (task.get("skipped") or {}).items():
                lines.append(f"- {key} skipped: {reason}")
            lines.append("")
        for label, figure in (task.get("figures") or {}).items():
            lines += [f"![{label}]({figure})", ""]
        if task.get("settings"):
            lines += ["<details><summary>settings</summary>", "", "```json",
                      json.dumps(task["settings"], indent=2, default=_json_default), "```", "",
                      "</details>", ""]
    return "\n".join(lines)
