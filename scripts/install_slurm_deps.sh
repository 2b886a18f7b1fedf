#!/usr/bin/env bash
# Installs what the `slurm` tests need (slurmctld, slurmd, the sbatch/srun/scontrol/sinfo clients, munge) from
# Debian's packages, when they are missing and we can: as root, with apt-get. Never fails the build: where it cannot
# install, the slurm tests skip and say why; where apt-get fails, it prints apt-get's own words.
set -uo pipefail

# Debian puts the daemons in /usr/sbin, which a non-login shell's PATH may lack.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
# slurm-wlm is only a metapackage over these three; munge comes in as their dependency but is named to be explicit.
PACKAGES=(slurmctld slurmd slurm-client munge)
COMMANDS=(slurmctld slurmd munged sbatch srun scontrol sinfo squeue)

missing=()
for cmd in "${COMMANDS[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "slurm-deps: ${missing[*]} missing; installing needs root and apt-get: the slurm tests will skip"
    exit 0
fi

echo "slurm-deps: installing ${PACKAGES[*]} (missing: ${missing[*]})"
export DEBIAN_FRONTEND=noninteractive
# A fresh machine may still be running unattended-upgrades at boot: wait for its dpkg lock instead of failing at once.
LOCK_WAIT=(-o DPkg::Lock::Timeout=120)
if ! log=$(apt-get "${LOCK_WAIT[@]}" update -qq 2>&1 &&
           apt-get "${LOCK_WAIT[@]}" install -y -qq --no-install-recommends "${PACKAGES[@]}" 2>&1); then
    echo "$log" | tail -n 30
    echo "slurm-deps: apt-get failed (output above): the slurm tests will skip"
    exit 0
fi
echo "slurm-deps: installed"
