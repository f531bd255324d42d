DROP TABLE IF EXISTS import_rows;
DROP TABLE IF EXISTS import_jobs;
