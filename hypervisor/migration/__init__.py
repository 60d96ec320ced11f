# -*- test-case-name: tests.test_migration_real -*-
"""
Moving VMs between hypervisors: access tokens (L{hypervisor.manager.tokens}),
MigrateVm and CopyVm between two of our daemons (L{service}), and our volume transfer
(L{transfer}, wire structs in L{messages}).

MigrateVm is called on the target, which pulls from the source with its own
certificate as the reference does: GetVmInfo; PrepareVmForMigration (a stopped VM at
once, a running one after the first pass); every volume copied by ReadVmVolume with
progress; a running source stopped, prepared, and the volumes re-synced (only the
chunks that changed); the user data; the VM started here with its address; then
C{RequestCommit} to the client, whose C{MigrateVmResponseResponse} decides; on
commit the addresses are registered here and the source's copy destroyed.

The fault invariant
===================

I{Whatever fails mid-migration (the network cut, the target or the source killed
at any point), afterwards exactly one copy of the VM is running or stoppable, on one
hypervisor, with its addresses registered exactly once.} How:

1. One commit point. The target's C{info.json} with C{Uncommitted=false} is the only
   fact that moves ownership. Before it is on disk the source owns the VM; after it,
   the target does. Everything else follows from which side of that write a failure
   falls on.
2. Persisted records on both sides, written before the step they cover:
   - the target creates the VM I{first}, before it asks the source for anything:
     C{info.json} with C{Uncommitted=true} and state migrating, and C{pending.json}
     C{{"Phase": "creating", "Migration": "in"}};
   - the source's PrepareVmForMigration writes C{migration.json} (the target's
     address, whether the VM ran) before its C{info.json} says migrating and
     uncommitted, and only then unregisters the addresses.
3. Addresses: an uncommitted VM never holds a registered address on either side
   (the source unregisters them when prepared; the target registers them only after
   its commit write; the pool's repair at start ignores uncommitted VMs). A
   migrating VM gets no DHCP answers (its running copy's daemon answers).
4. Rules when a daemon (re)starts or notices a failure:
   - target: a VM marked C{"Migration": "in"} that is still uncommitted is removed
     (domain off, files; no address to release) — the reconciliation's rule for an
     interrupted creation. One already committed keeps running and loses the mark.
   - target, a failure it sees itself (a transfer error, the client gone or saying
     abandon): its copy is removed, then the source is told PrepareVmForMigration
     (disable) and StartVm if the VM ran, as the reference does.
   - source: every VM in state migrating with a target in C{migration.json} is
     checked at start and every C{HYPERVISOR_MIGRATION_CHECK_INTERVAL} seconds (30):
     the target is asked GetVmInfo with the source's own certificate. Committed
     there: our copy is removed (its addresses stay unregistered here). Unknown
     there: the migration is undone here (addresses registered again, state
     stopped, started again if it ran). Uncommitted there (still under way) or no
     answer: asked again later — meanwhile the VM is stopped here and stoppable or
     destroyable by its owner, and its address is registered nowhere until one side
     decides (the target cannot commit without the client, and then it registers).
5. One libvirtd for two daemons (the tests): domains carry the hypervisor's uuid in
   our metadata, and a daemon never looks up, stops or adopts a domain another
   daemon made (L{hypervisor.virt.domains.uuid_of}); a migrating VM whose name
   matches a running domain is not recorded running.

The worst case is a partition that lasts: the VM is then stopped on the source and
either uncommitted on the target (removed there when it restarts or gives up) or
committed there and running; never running on both, since the target starts its
copy only after the source reported it stopped and prepared.
"""
