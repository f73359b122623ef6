"""Measurement: the numbers and table that compare a classifier's variants (`classifier_metrics`), the pipeline
reports for classifiers (`compression_report`) and causal LMs (`lm_report`), and CPU generation speed
(`generation_speed`)."""
