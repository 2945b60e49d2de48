"""Score images with a trained model: exactly one Parquet row per input file.

The job lives in ``pipeline.scoring`` (one module per concern); this module
keeps the names callers import.
"""

from pipeline.scoring.commit import SCHEMA, SUMMARY_NAME, to_table
from pipeline.scoring.decode import NO_ERROR, read_and_decode, read_files, to_uint8
from pipeline.scoring.execute import run_score
from pipeline.scoring.lease import OutputLease
from pipeline.scoring.listing import LIST_SUFFIXES
from pipeline.scoring.parts import PART_NAME, PLAN_DIR, PartSpec
from pipeline.scoring.plan import ScorePlan, plan_score, prepare_parts
from pipeline.scoring.predictor import ScoringPredictor

__all__ = ["SCHEMA", "SUMMARY_NAME", "NO_ERROR", "LIST_SUFFIXES", "PART_NAME", "PLAN_DIR", "OutputLease", "PartSpec",
           "ScorePlan", "ScoringPredictor", "plan_score", "prepare_parts", "read_and_decode", "read_files",
           "run_score", "to_table", "to_uint8"]
