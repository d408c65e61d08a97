"""``covidctnet defaults``: print a command's default config (what ``configs/<file>`` holds)."""

from __future__ import annotations

import click

from covidctnet.cli.options import resolve_ref

# file in configs/ -> ("module:ConfigClass", "module:PRESET" or None). The YAML files are generated from these
# dataclasses (tests/core/test_config.py keeps them equal), so a default is written in one place only.
CONFIG_FILES: dict[str, tuple[str, str | None]] = {
    "preprocess.yaml": ("covidctnet.preprocessing.preprocess:PreprocessConfig", None),
    "preprocess_official.yaml": ("covidctnet.preprocessing.preprocess:PreprocessConfig",
                                 "covidctnet.preprocessing.preprocess:OFFICIAL_PROFILE"),
    "denoiser.yaml": ("covidctnet.training.denoiser:DenoiserConfig", None),
    "lesion_model.yaml": ("covidctnet.training.lesion:LesionModelConfig", None),
    "residuals.yaml": ("covidctnet.inference.residuals:ResidualGrid", None),
    "classifier.yaml": ("covidctnet.training.classifier:ClassifierConfig", None),
    "predict.yaml": ("covidctnet.inference.predict:PredictConfig", None),
    "slice_scores.yaml": ("covidctnet.inference.slice_scores:SliceScoresConfig", None),
    "validate_residuals.yaml": ("covidctnet.evaluation.residual_validation:ValidateResidualsConfig", None),
    "slice.yaml": ("covidctnet.training.slice:SliceTrainConfig", None),
    "pretrain_slice.yaml": ("covidctnet.training.simclr:PretrainSliceConfig", None),
    "cam_scale.yaml": ("covidctnet.models.grad_cam:CamScaleConfig", None),
    "evaluate.yaml": ("covidctnet.evaluation.evaluate:EvaluateConfig", None),
    "reader_study.yaml": ("covidctnet.evaluation.reader_study:ReaderStudyConfig", None),
}


def config_text(name: str) -> str:
    """The generated text of ``configs/<name>``."""
    from covidctnet.core.config import config_yaml

    cls, preset = CONFIG_FILES[name]
    title = None
    if preset:  # a preset's header says what it is for, not the command's defaults
        title = (f"{name}: {cls.rsplit(':', 1)[1]} with {preset.rsplit(':', 1)[1]} applied "
                 "(`covidctnet preprocess --profile official`: the official CovidCTNet numerics, for its weights).")
    return config_yaml(resolve_ref(cls), resolve_ref(preset) if preset else None, title)


@click.command("defaults")
@click.argument("name", type=click.Choice(sorted(n.removesuffix(".yaml") for n in CONFIG_FILES)))
def defaults_cmd(name):
    """Print the default config NAME as commented YAML: copy it, edit it, pass it with --config."""
    click.echo(config_text(f"{name}.yaml"), nl=False)
