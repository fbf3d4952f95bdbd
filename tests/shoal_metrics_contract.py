"""The Ray Serve metrics shoal promises to export (issue 9, item 2), by the name Prometheus shows.

Every name here is one of Ray 2.60's (``ray_serve_metrics.BY_NAME``; a unit test checks it), and
an instance exports it with exactly Ray's label names once its feature has run
(``tests/integration/test_metrics_names.py``).
"""

from __future__ import annotations

HTTP_PROXY = (
    "ray_serve_num_http_requests_total",
    "ray_serve_num_http_error_requests_total",
    "ray_serve_http_request_latency_ms",
    "ray_serve_num_ongoing_http_requests",
    "ray_serve_num_deployment_http_error_requests_total",
)
REPLICA = (
    "ray_serve_deployment_request_counter_total",
    "ray_serve_deployment_error_counter_total",
    "ray_serve_deployment_processing_latency_ms",
    "ray_serve_replica_processing_queries",
    "ray_serve_deployment_replica_starts_total",
)
ROUTER = (
    "ray_serve_deployment_queued_queries",
    "ray_serve_num_router_requests_total",
    "ray_serve_handle_request_counter_total",
)
CONTROLLER = (
    "ray_serve_deployment_replica_healthy",
    "ray_serve_replica_startup_latency_ms",
    "ray_serve_health_check_failures_total",
    "ray_serve_autoscaling_target_replicas",
    "ray_serve_autoscaling_desired_replicas",
    "ray_serve_autoscaling_total_requests",
)
BATCHING = (
    "ray_serve_batch_queue_length",
    "ray_serve_actual_batch_size",
    "ray_serve_batch_wait_time_ms",
    "ray_serve_batch_execution_time_ms",
    "ray_serve_batches_processed_total",
)
MULTIPLEXING = (
    "ray_serve_num_multiplexed_models",
    "ray_serve_multiplexed_model_load_latency_ms",
    "ray_serve_multiplexed_models_load_counter_total",
)

REQUIRED: tuple[str, ...] = HTTP_PROXY + REPLICA + ROUTER + CONTROLLER + BATCHING + MULTIPLEXING
