-- A job reads its rows in the order pgml.tune() copied them (test_sampling 'last' takes the split from that order).
-- _child_rows already turns synchronize_seqscans off; a parallel scan (PostgreSQL plans one for RETURN QUERY over a
-- table past min_parallel_table_scan_size, 8 MB by default, on a server with parallel workers) hands rows back in
-- whatever order its workers produce them, so a large job's split changed from one read to the next: seen with
-- 24,000 reviews on a 16-core host. Read serially.
ALTER FUNCTION pgml._child_rows(bigint, text) SET max_parallel_workers_per_gather = 0;
