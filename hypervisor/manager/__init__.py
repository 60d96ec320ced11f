"""
The VM manager: owns the state directory and every mutation of VMs.
"""
