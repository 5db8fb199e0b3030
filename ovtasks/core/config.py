"""One typed configuration object for the whole platform.

Parsed once at an entry point (CLI command or Airflow task) from an optional YAML file plus
``OVTASKS_*`` environment variables, then passed down explicitly. Nested fields are addressed with a
double underscore: ``OVTASKS_INGEST__PUNSAFE_MAX=0.3``, ``OVTASKS_S3__ENDPOINT=minio:9000``.
Precedence (lowest first): defaults, YAML file, environment.

Defaults are the embedded ones: a local store under ``data_dir`` and no credentials. Credentials are
never given defaults in code; S3 access needs them from the environment or a secret-mounted file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

ENV_PREFIX = "OVTASKS_"
CONFIG_ENV = "OVTASKS_CONFIG"
# OVTASKS_* variables that are not settings, read where they are used: the model loader's local cache, and
# the CLI's OVTASKS_TRACEBACK=1 (print the traceback of an error)
NOT_SETTINGS = frozenset({CONFIG_ENV, "OVTASKS_MODEL_CACHE", "OVTASKS_TRACEBACK"})
# The variables Kubernetes gives every pod for each Service of its namespace (enableServiceLinks): a release
# named ``ovtasks`` makes ``OVTASKS_MINIO_PORT=tcp://10.0.0.1:9000``, ``OVTASKS_MLFLOW_SERVICE_HOST`` ...
SERVICE_LINK = re.compile(r"^[A-Z0-9_]+_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT(_\d+_(TCP|UDP|SCTP)(_PROTO|_PORT|_ADDR)?)?)$")

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """The configuration file or environment could not be turned into a valid Settings."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class S3Config(_Frozen):
    """Connection to an S3-compatible object store (MinIO in docker/helm, SeaweedFS in tests)."""

    endpoint: str = Field("", description="host:port of the S3 API, without scheme")
    access_key: SecretStr | None = None
    secret_key: SecretStr | None = None
    secure: bool = Field(False, description="use TLS")
    cert_check: bool = Field(True, description="verify the server certificate when secure")
    region: str | None = None
    retries: int = Field(5, ge=0, le=20, description="retries of a failed request (urllib3 backoff)")
    credentials: str = Field("static", pattern="^(static|chain)$",
                             description="static: access_key/secret_key; chain: when they are unset, the standard AWS "
                                         "chain (AWS_* / MINIO_* environment, ~/.aws, web identity, container or "
                                         "instance-profile credentials)")

    @field_validator("endpoint")
    @classmethod
    def _no_scheme(cls, v: str) -> str:
        for scheme in ("http://", "https://"):
            if v.startswith(scheme):
                raise ValueError(
                    f"endpoint must be host:port without scheme (got {v!r}); set s3.secure for TLS"
                )
        return v


class IngestConfig(_Frozen):
    """Filters of the ingest stage. Every filter can be switched off or re-thresholded."""

    require_english: bool = True
    english_min_score: float = Field(
        0.2, ge=0.0, le=1.0, description="English kept when top-1, or when its probability reaches this"
    )
    other_language_min_score: float = Field(
        0.5, ge=0.0, le=1.0, description="non-English only when another language is at least this likely"
    )
    punsafe_max: float | None = Field(0.5, ge=0.0, le=1.0, description="None disables")
    pwatermark_max: float | None = Field(None, ge=0.0, le=1.0, description="None disables")
    keep_missing_punsafe: bool = Field(
        True, description="a sample without a punsafe value passes the punsafe filter"
    )
    min_side: int = Field(64, ge=1)
    max_aspect_ratio: float = Field(3.0, ge=1.0)
    max_pixels: int = Field(
        40_000_000, ge=1, description="decompression-bomb guard on the declared size"
    )
    max_image_bytes: int = Field(32 * 1024 * 1024, ge=1)
    max_caption_bytes: int = Field(2000, ge=1)
    max_parquet_rows: int = Field(100_000, ge=1, description="a shard's parquet with more rows fails the shard, unread "
                                  "(img2dataset writes 10000 per shard; memory is ~1 KB per row)")
    dedup: bool = True
    dedup_max_distance: int = Field(
        4, ge=0, le=16, description="Hamming distance of 64-bit pHashes counted as a near duplicate"
    )
    scaled_decode: bool = Field(
        True, description="decode a JPEG published as its original bytes at 1/2-1/8 scale, luma only, for the checks and the hash "
        "(every entropy-coded byte is still read, so truncated or corrupt files fail as in a full decode)"
    )
    check_view_side: int = Field(
        64, ge=32, le=4096, description="with scaled_decode: the smallest side of that reduced-scale view (the pHash "
        "thumbnail is 32 px). 64: a 512 px JPEG decodes at 1/8 (22 % less decode time than the 1/4 a 128 px view needs) "
        "with the pHash as close to full decodes' (0.47 bits of 64 differ on average on 1600 synthetic 512 px images; 58 "
        "near duplicates found where full decodes find 59)"
    )
    allow_animated: bool = Field(False, description="keep the first frame of animated images")
    reencode_quality: int = Field(95, ge=50, le=100, description="JPEG quality when re-encoding")


class SynthConfig(_Frozen):
    image_size: int = Field(192, ge=32, le=2048)
    failure_rate: float = Field(
        0.15, ge=0.0, le=0.9, description="fraction of samples made to fail an ingest filter"
    )


class CandidatesConfig(_Frozen):
    """Object candidates: which extractor proposes names, against which vocabulary."""

    extractor: str = Field("lexicon", pattern="^(lexicon|llm)$")
    vocabulary: str | None = Field(None, description="vocabulary file (JSON/YAML); None = the built-in synthetic one")
    llm_model: str | None = Field(None, description="causal LM: Hugging Face id or local directory")
    llm_batch_size: int = Field(8, ge=1)
    llm_max_new_tokens: int = Field(32, ge=1, le=512)
    keep_unknown: bool = Field(True, description="keep names outside the vocabulary as open-vocabulary categories")
    text_encoder: str = Field("minilm", description="'minilm' (offline default) or a CLIP id/directory")


class MaskFreeConfig(_Frozen):
    """The Mask-free OVIS generator (patent eq. 1-7). Model paths are ids, directories or store URIs."""

    itm_model: str | None = Field(None, description="BlipForImageTextRetrieval: HF id, directory or store URI")
    itm_layer: int | None = Field(None, description="cross-attention layer for GradCAM (default: the middle one)")
    prompt: str = Field("a photo of a {name}", description="text prompt per object name")
    activation: str = Field("itm", pattern="^(itm|backbone)$", description="stage 1's map: the ITM's GradCAM at the "
                            "object word (itm, the patent's) or the class activation map of the caption-pretrained backbone "
                            "(backbone: backbone_model's name heads; names outside its vocabulary keep the ITM's map)")
    backbone_model: str | None = Field(None, description="activation=backbone or box_rerank=backbone: `ovtasks "
                                       "pretrain-backbone` output with its name heads (directory or store URI)")
    masking_rounds: int = Field(3, ge=1, le=10, description="G in eq. 4")
    mask_fraction: float = Field(0.5, gt=0.0, lt=1.0, description="IM() threshold on the normalised map")
    proposals: str = Field("wspn", pattern="^(wspn|selective_search|gdino)$",
                           description="gdino: Grounding-DINO boxes for the caption's names (grounded.gdino_model)")
    wspn_model: str | None = Field(None, description="trained WSPN checkpoint (file or store URI)")
    top_k: int = Field(50, ge=1, description="K proposals kept at inference")
    wss_points: int = Field(32, ge=1, description="Z foreground and Z background points per box")
    wss_iterations: int = Field(100, ge=1)
    wss_lr: float = Field(0.25, gt=0.0)
    wss_crop: int = Field(64, ge=8, le=512, description="side of the box crop fed to the WSS network")
    wss_hidden: int = Field(16, ge=1)
    box_map: str = Field("binary", pattern="^(binary|soft)$", description="Phi in eq. 6: the binary union of eq. 4 (the "
                         "patent's) or the soft map (max over rounds of the normalised maps)")
    box_area_exponent: float = Field(0.5, ge=0.0, le=1.0, description="eq. 6 divides a box's summed Phi by its area to this "
                                     "power (0.5: the patent's sqrt; lower favours larger boxes)")
    box_ring: float = Field(0.0, ge=0.0, le=2.0, description="eq. 6 by contrast: subtract the mean Phi of a ring this "
                            "fraction of the box's side wide around it, times the box's area (0: the patent's eq. 6)")
    box_rerank: str = Field("none", pattern="^(none|crop|wspn|backbone|namer)$", description="re-rank eq. 6's best "
                            "box_rerank_top boxes by a second opinion: score = eq. 6 score / the best one x q ** "
                            "box_rerank_weight, q the ITM's match probability of the prompt on the box's crop (crop), the "
                            "WSPN's instance score of the name for the box relative to its best box (wspn; needs "
                            "proposals=wspn), the caption-pretrained backbone's probability of the name on the box's crop "
                            "(backbone; needs backbone_model) or that backbone naming the box's region as Semantic-SAM's "
                            "namer does: the crop, its name maps in the box and the region SAM segments in the box (namer; "
                            "needs backbone_model and grounded.sam_model). none: the patent's eq. 6")
    box_rerank_top: int = Field(5, ge=1, le=100, description="how many of eq. 6's best boxes box_rerank considers")
    box_rerank_weight: float = Field(1.0, ge=0.0, description="exponent of the second opinion in box_rerank")
    box_crop_context: float = Field(0.1, ge=0.0, le=3.0, description="box_rerank=crop / backbone: the crop shown to the ITM "
                                    "or the backbone is the box grown by this fraction of its side on every side (the "
                                    "backbone was trained on whole scenes: 1.0 names GT boxes best, 0.1 worst)")
    instances: str = Field("one", pattern="^(one|caption)$", description="pseudo-masks per candidate name: one (the "
                           "patent's eq. 6 box) or as many as the caption says (caption: 'two balls' -> eq. 6's two best "
                           "boxes that overlap each other by less than instance_iou; a bare plural counts as two; at "
                           "most max_instances)")
    instance_iou: float = Field(0.3, gt=0.0, le=1.0, description="instances=caption: a further box must overlap each box "
                                "already chosen for the name by less than this IoU")
    max_instances: int = Field(4, ge=1, le=10, description="instances=caption: at most this many boxes per name")
    wss_fg_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="foreground points come from this most activated "
                                   "fraction of the box's pixels")
    wss_bg_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="background points from this least activated fraction")
    wss_box_margin: float = Field(0.0, ge=0.0, le=2.0, description="grow the eq. 6 box by this fraction of its side on every "
                                  "side before WSS (0: the patent's crop; > 0 lets the mask reach past a box that fell inside "
                                  "the object; the annotation's bbox is then the mask's)")
    wss_point_map: str = Field("map", pattern="^(map|box|map_box)$", description="what WSS samples its points from: the "
                               "activation map (the patent's), a centre prior of the eq. 6 box (1 at its centre, 0 at and "
                               "outside its edges; use with wss_box_margin > 0 so background points fall outside the box), "
                               "or their product")
    mask_stage: str = Field("wss", pattern="^(wss|sam)$", description="the pseudo box's mask: eq. 7's WSS network (the "
                            "patent's) or SAM prompted with the box (sam: grounded.sam_model; the wss_* settings are then "
                            "unused)")
    min_score: float = Field(0.0, ge=0.0, le=1.0, description="drop candidates whose ITM score is below")
    batch_size: int = Field(8, ge=1, description="images per GradCAM batch")
    seed: int = 0


class GroundedConfig(_Frozen):
    """The grounded generator (thesis): Grounding-DINO boxes for the candidate names, SAM masks from them."""

    gdino_model: str | None = Field(None, description="GroundingDinoForObjectDetection: HF id, directory or store URI")
    sam_model: str | None = Field(None, description="SamModel: HF id, directory or store URI")
    box_threshold: float = Field(0.35, ge=0.0, le=1.0)
    text_threshold: float = Field(0.25, ge=0.0, le=1.0)
    nms_iou: float = Field(0.5, gt=0.0, le=1.0, description="per-image NMS within a category")
    max_detections: int = Field(100, ge=1, description="boxes kept per image")
    batch_size: int = Field(4, ge=1, description="images (prompt rows) per Grounding-DINO / SAM micro-batch")
    box_batch: int = Field(64, ge=1, description="boxes decoded together per SAM call")
    pipeline_depth: int = Field(4, ge=1, description="micro-batches per labelling call; above 1, Grounding-DINO runs on "
                                "micro-batch k+1 while SAM segments micro-batch k (a thread; its own CUDA stream on a GPU)")
    dtype: str = Field("auto", pattern="^(auto|float32|bfloat16|float16)$", description="auto: bf16 on CUDA, fp32 on CPU")


class ValidateConfig(_Frozen):
    """Great Expectations gate over a shard's pseudo-labels; a failing shard is excluded from training."""

    max_box_overflow_px: float = Field(1.0, ge=0.0, description="how far a box may reach past the image border")
    min_mask_box_ratio: float = Field(0.05, ge=0.0, description="mask area / box area, lower bound")
    max_mask_box_ratio: float = Field(1.05, gt=0.0, description="mask area / box area, upper bound")
    mask_box_ratio_mostly: float = Field(0.95, gt=0.0, le=1.0, description="fraction of instances that must be within the ratio bounds")
    max_instances_per_image: int = Field(50, ge=1)
    duplicate_iou: float = Field(0.95, gt=0.0, le=1.0, description="same category and mask IoU above this = duplicate")
    max_duplicate_rate: float = Field(0.02, ge=0.0, le=1.0)
    instance_score_floor: float = Field(0.0, ge=0.0, le=1.0, description="an image counts as labelled with an instance scoring at least this")
    min_labelled_image_fraction: float = Field(0.3, ge=0.0, le=1.0)


class RegistryConfig(_Frozen):
    """MLflow tracking and model registry."""

    tracking_uri: str | None = Field(None, description="None: sqlite under <data_dir>/mlflow; production: http://mlflow:5000")
    artifact_root: str | None = Field(None, description="experiment artifact location (s3://... in production)")
    experiment: str = "ovtasks"
    # registered-model names go into MLflow filter strings and models:/ URIs: letters, digits, . _ - only
    model_name: str = Field("ovtasks-ov-maskrcnn", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
                            description="registered model of the OV Mask R-CNN")
    semantic_sam_model_name: str = Field("ovtasks-semantic-sam", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
                                         description="registered model of Semantic-SAM")
    promotion_tolerance: float = Field(1.0, ge=0.0, le=10.0, allow_inf_nan=False,
                                       description="margin: novel mask AP50 points the challenger may lose to the champion "
                                       "(lower end of the paired-bootstrap interval of the difference)")
    lock_db: SecretStr | None = Field(None, description="postgresql://... where promotions and rollbacks take an advisory "
                                      "lock (every worker and the api-server reach it); None: a lock file beside the "
                                      "embedded registry, which serialises one machine only")
    max_promotion_tolerance: float = Field(10.0, ge=0.0, le=50.0, allow_inf_nan=False,
                                           description="the largest margin any path (UI, DAG, CLI) may ask for")
    promotion_confidence: float = Field(0.95, gt=0.0, lt=1.0, description="confidence of the paired-bootstrap interval")
    bootstrap_samples: int = Field(1000, ge=10, description="paired bootstrap samples over the evaluation images")
    bootstrap_seed: int = 0
    min_novel_ap50: float = Field(5.0, ge=0.0, description="floor: a model below this novel mask AP50 is never champion")


class AirflowClientConfig(_Frozen):
    """How ``ovtasks status`` / ``ovtasks trigger`` reach the Airflow api-server (token from /auth/token)."""

    url: str = Field("http://127.0.0.1:8080", description="api-server base URL")
    username: str = "admin"
    password: SecretStr | None = Field(None, description="set OVTASKS_AIRFLOW__PASSWORD or OVTASKS_AIRFLOW__PASSWORD_FILE")


class UiConfig(_Frozen):
    """The Airflow UI plugin."""

    thumb_size: int = Field(256, ge=32, le=1024, description="longest side of gallery thumbnails (px)")
    thumb_cache: str | None = Field(None, description="directory of cached thumbnails (default <data_dir>/cache/ui)")
    page_size_max: int = Field(100, ge=1, le=1000)
    promote_dag: str = Field("ovtasks_promote", description="promoting needs permission to trigger this DAG (and an admin-level role)")
    promoter_roles: tuple[str, ...] = Field(("Admin",), description="Airflow roles (FAB) that may move the champion; with the "
                                            "simple auth manager: the ADMIN role. The same rule in the UI and in a "
                                            "promote DAG run triggered by a user")


class PipelineConfig(_Frozen):
    """Where the scheduled pipeline (the Airflow DAGs) reads and writes; None: under ``data_dir``."""

    source_uri: str | None = Field(None, description="img2dataset shards arrive here (default <data_dir>/laion)")
    clean_uri: str | None = Field(None, description="ingested shards (default <data_dir>/clean)")
    pseudo_uri: str | None = Field(None, description="root of pseudo/<generator>/ (default <data_dir>)")
    models_uri: str | None = Field(None, description="trained model directories (default <data_dir>/models)")
    eval_gt_uri: str | None = Field(None, description="COCO GT that models are evaluated on (default: the source's gt/instances.json)")
    sa1b_uri: str | None = Field(None, description="SA-1B-format tars for Semantic-SAM")
    semantic_sam_start: str | None = Field(None, description="the SamModel a Semantic-SAM retrain starts from (HF id, "
                                           "directory or store URI, e.g. one made by `ovtasks train-sam`); None: a tiny "
                                           "random SAM")
    semantic_sam_namer: str | None = Field(None, description="the caption-pretrained backbone a Semantic-SAM retrain attaches "
                                           "to name prompts beside its semantic tokens (`ovtasks pretrain-backbone` output, "
                                           "directory or store URI); None: the tokens alone")
    ov_maskrcnn_backbone: str | None = Field(None, description="the backbone an OV Mask R-CNN retrain starts from (directory "
                                             "or store URI made by `ovtasks pretrain-backbone`: caption names only); None: random")
    generator: str = Field("maskfree", pattern="^(maskfree|grounded)$")
    shards_per_task: int = Field(1, ge=1, description="pseudo-label shards per mapped task (past 1024 shards they are grouped anyway)")
    max_map_length: int = Field(1024, ge=1, description="Airflow's [core] max_map_length")

    def resolved(self, data_dir: Path) -> dict[str, str]:
        d = str(Path(data_dir).absolute())
        return {"source": self.source_uri or f"{d}/laion", "clean": self.clean_uri or f"{d}/clean", "pseudo": self.pseudo_uri or d,
                "models": self.models_uri or f"{d}/models", "eval_gt": self.eval_gt_uri or self.source_uri or f"{d}/laion",
                "sa1b": self.sa1b_uri or ""}


class PathsConfig(_Frozen):
    """The project's own files that are not Python: relative paths are taken from the working directory
    (the repository root for `make demo`, the image's /opt/ovtasks in docker/helm)."""

    dags_folder: Path = Field(Path("dags"), description="the DAG files the embedded mode runs")
    plugins_folder: Path = Field(Path("plugins"), description="the Airflow plugin (the ovtasks UI)")
    benchmark_results: Path = Field(Path("benchmarks/results"), description="measured throughputs that `ovtasks plan` reads")
    committed_itm: Path = Field(Path("models/itm-synth"), description="the ITM checkpoint `ovtasks demo` uses when present")
    committed_sam: Path = Field(Path("models/sam-synth"), description="the SAM checkpoint (`ovtasks train-sam`) `ovtasks "
                                "demo` starts Semantic-SAM from when present")
    committed_backbone: Path = Field(Path("models/backbone-synth"), description="the caption-pretrained OV Mask R-CNN backbone "
                                     "(`ovtasks pretrain-backbone`) `ovtasks demo` starts the detector from when present")


class Settings(_Frozen):
    """Everything configurable. Build it with :func:`load_settings`."""

    data_dir: Path = Path("data")
    s3: S3Config = S3Config()
    ingest: IngestConfig = IngestConfig()
    synth: SynthConfig = SynthConfig()
    candidates: CandidatesConfig = CandidatesConfig()
    maskfree: MaskFreeConfig = MaskFreeConfig()
    grounded: GroundedConfig = GroundedConfig()
    validation: ValidateConfig = ValidateConfig()
    registry: RegistryConfig = RegistryConfig()
    pipeline: PipelineConfig = PipelineConfig()
    airflow: AirflowClientConfig = AirflowClientConfig()
    ui: UiConfig = UiConfig()
    paths: PathsConfig = PathsConfig()
    label_chunk: int = Field(64, ge=1, description="images of a shard labelled at a time (memory stays flat in shard size)")
    device: str = Field("cpu", description="torch device for model stages: cpu, cuda, cuda:1, ...")
    workers: int = Field(2, ge=1, le=256)
    log_format: str = Field("auto", pattern="^(auto|json|text)$")

    def fingerprint(self, section: str) -> str:
        """Stable hash of one section, recorded in manifests so outputs name their config."""
        data = getattr(self, section).model_dump(mode="json")
        blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _set_nested(target: dict, path: list[str], value: Any) -> None:
    for part in path[:-1]:
        node = target.get(part)
        if not isinstance(node, dict):
            node = {}
            target[part] = node
        target = node
    target[path[-1]] = value


_TEXT_TYPES = (str, SecretStr, Path)


def _is_text_field(path: list[str]) -> bool:
    """Whether ``path`` (``["s3", "secret_key"]``) names a text setting (str, secret, path, or None of
    those): its env value is taken verbatim, never as YAML."""
    model: Any = Settings
    for i, part in enumerate(path):
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return False
        ann = field.annotation
        types = [t for t in (get_args(ann) if get_origin(ann) in (Union, type(int | None)) else (ann,)) if t is not type(None)]
        if i == len(path) - 1:
            return bool(types) and all(isinstance(t, type) and issubclass(t, _TEXT_TYPES) for t in types)
        nested = [t for t in types if isinstance(t, type) and issubclass(t, BaseModel)]
        if not nested:
            return False
        model = nested[0]
    return False


def _parse_env_value(raw: str, text: bool = False) -> Any:
    """Env values are YAML scalars (``0.3`` → float, ``false`` → bool, ``null`` → None), except for text
    settings, secrets above all: ``hunter2 #prod``, ``0755``, ``yes`` and ``~`` stay exactly what was set."""
    if text or raw == "":
        return raw
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _yaml_error(exc: yaml.YAMLError) -> str:
    """Where and what, never the offending line itself (it may hold a secret)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or type(exc).__name__
    return f"YAML syntax error at line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else f"YAML error: {problem}"


def setting_path(key: str) -> list[str] | None:
    """The settings path an ``OVTASKS_*`` variable names (``OVTASKS_S3__ENDPOINT`` -> ``["s3", "endpoint"]``), or
    None for a variable that is not a setting: one read elsewhere (:data:`NOT_SETTINGS`), a Kubernetes
    service link (``OVTASKS_MINIO_PORT``, ``OVTASKS_MLFLOW_SERVICE_HOST``), or any name whose first part is no
    setting or section. A name inside a known section stays a setting even when that section has no such key,
    so a typo there (``OVTASKS_S3__ENDPIONT``) is an error, never ignored."""
    if not key.startswith(ENV_PREFIX) or key in NOT_SETTINGS:
        return None
    parts = [p.lower() for p in key[len(ENV_PREFIX):].split("__") if p]
    if not parts or parts[0] not in Settings.model_fields:
        return None
    if len(parts) == 1 and SERVICE_LINK.match(key):
        return None  # a top-level name that only a service link spells (a Service called e.g. ovtasks-device)
    return parts


def _secret_files(env: Mapping[str, str]) -> dict[str, str]:
    """``OVTASKS_S3__SECRET_KEY_FILE=/run/secrets/x`` reads the value from a mounted file."""
    out = {}
    for key, path in env.items():
        if key.endswith("_FILE") and setting_path(key[: -len("_FILE")]) is not None:
            try:
                out[key[: -len("_FILE")]] = Path(path).read_text().strip()
            except OSError as exc:
                raise ConfigError(f"{key}: cannot read {path}: {exc}") from exc
    return out


def load_settings(path: str | os.PathLike | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Parse YAML (``path`` or ``$OVTASKS_CONFIG``) and ``OVTASKS_*`` overrides into Settings.

    Raises :class:`ConfigError` naming the offending key when anything is invalid.
    """
    env = dict(os.environ if env is None else env)
    path = path or env.get(CONFIG_ENV)
    data: dict[str, Any] = {}
    if path:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"cannot read config file {path}: {_yaml_error(exc)}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping, got {type(loaded).__name__}")
        data = loaded
    overrides = {k: v for k, v in env.items() if k.startswith(ENV_PREFIX) and not k.endswith("_FILE")}
    files = _secret_files(env)
    overrides.update(files)
    ignored = []
    for key, raw in sorted(overrides.items()):
        parts = setting_path(key)
        if parts is None:
            if key not in NOT_SETTINGS:
                ignored.append(key)
            continue
        _set_nested(data, parts, _parse_env_value(raw, text=key in files or _is_text_field(parts)))
    if ignored:  # names only: a service link's value is an address, but another variable's may be a secret
        log.debug("ignored %d OVTASKS_* variables that are not settings: %s", len(ignored), ", ".join(ignored))
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid configuration: {problems}") from exc
