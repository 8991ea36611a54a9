//! The MPI checks under a real `mpirun` (feature `mpi`) on 2 and 4 ranks: dispatch/combine
//! conformance (`dsv3-ep-check`) and pipelined training against sequential training
//! (`dsv3-pipeline-check`); both exit non-zero on any failure.
#![cfg(feature = "mpi")]

use std::process::Command;

#[test]
fn dispatch_and_combine_hold_across_mpi_processes() {
    for n in ["2", "4"] {
        let out = Command::new("mpirun")
            .args(["--allow-run-as-root", "--oversubscribe", "-np", n, env!("CARGO_BIN_EXE_dsv3-ep-check")])
            .output()
            .expect("mpirun (OpenMPI) must be installed for the mpi feature's tests");
        let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && text.contains("ep-check: ok"), "{n} ranks:\n{text}");
    }
}

#[test]
fn pipelined_training_equals_sequential_training_across_mpi_processes() {
    for n in ["2", "4"] {
        let out = Command::new("mpirun")
            .args(["--allow-run-as-root", "--oversubscribe", "-np", n, env!("CARGO_BIN_EXE_dsv3-pipeline-check")])
            .output()
            .expect("mpirun (OpenMPI) must be installed for the mpi feature's tests");
        let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && text.contains("pipeline-check: ok"), "{n} ranks:\n{text}");
    }
}
