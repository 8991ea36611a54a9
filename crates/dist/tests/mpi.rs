//! The MPI check under a real `mpirun` (feature `mpi`) on 2 and 4 ranks: pipelined training
//! against sequential training (`dsv3-pipeline-check`), which exits non-zero on any failure.
#![cfg(feature = "mpi")]

use std::process::Command;

/// Runs `exe` under `mpirun -np 2` and `-np 4`; each run must succeed and print `marker`.
fn under_mpirun(exe: &str, marker: &str) {
    for n in ["2", "4"] {
        let out = Command::new("mpirun")
            .args(["--allow-run-as-root", "--oversubscribe", "-np", n, exe])
            .output()
            .expect("mpirun (OpenMPI) must be installed for the mpi feature's tests");
        let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && text.contains(marker), "{n} ranks:\n{text}");
    }
}

#[test]
fn pipelined_training_equals_sequential_training_across_mpi_processes() {
    under_mpirun(env!("CARGO_BIN_EXE_dsv3-pipeline-check"), "pipeline-check: ok");
}
