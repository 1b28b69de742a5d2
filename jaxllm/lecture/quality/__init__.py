"""Data quality (the lecture's "quality matters more than quantity"): rules, dedup, a classifier, a report.

    from jaxllm.lecture.quality import FilterOptions, filter_documents
    report = filter_documents(["crawl.jsonl"], "clean.jsonl", FilterOptions(classifier="quality_model"))
    print(report["funnel"])   # 100% input -> 21% heuristics -> 14% exact_dedup -> ...

Modules: `rules` (heuristic rules, one pure function each), `profiles` (settings and profiles), `dedup`
(exact hashes, MinHash LSH), `classifier` (hashed n-gram logistic regression), `pipeline` (the ordered chain,
worker pool and report; the commands are in `jaxllm.cli.quality`).
Input is read by `jaxllm.data.sources.iter_documents` (streaming JSONL/text); bad input is a DataError.
"""

from jaxllm.lecture.quality.classifier import (QualityClassifier, TrainOptions, hashed_features,
                                               train_quality_classifier)
from jaxllm.lecture.quality.dedup import (ExactDeduplicator, MinHashConfig, MinHasher, NearDeduplicator,
                                          estimated_jaccard, exact_hash)
from jaxllm.lecture.quality.pipeline import STEPS, FilterOptions, filter_documents, format_report, heuristic_settings
from jaxllm.lecture.quality.profiles import heuristic_config_from
from jaxllm.lecture.quality.rules import (RULES, HeuristicConfig, TextView, check_all_rules, first_failing_rule,
                                          normalise)

__all__ = [
    "QualityClassifier", "TrainOptions", "hashed_features", "train_quality_classifier",
    "ExactDeduplicator", "MinHashConfig", "MinHasher", "NearDeduplicator", "estimated_jaccard", "exact_hash",
    "STEPS", "FilterOptions", "filter_documents", "format_report", "heuristic_settings",
    "RULES", "HeuristicConfig", "TextView", "check_all_rules", "first_failing_rule", "heuristic_config_from",
    "normalise",
]
