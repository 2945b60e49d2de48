"""What every process of a job needs around the stages: Ray start-up
(``cluster``), filtering of native start-up notices (``native_logs``) and the
fault injection the fault tests use (``faults``)."""
