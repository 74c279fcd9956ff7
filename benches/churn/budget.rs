//! The process's memory budget, as docs/OPERATIONS.md states it
//! ("Memory budget"): a bound on RSS from the settings alone.

use link_counter::Settings;

/// Binary, runtime, threads and allocator arenas of an idle node (KiB).
pub const BASE_KIB: u64 = 24 << 10;
/// Per open connection (KiB): the `memory` scenario's target.
pub const CONNECTION_KIB: f64 = 4.0;
/// Per page room (KiB).
pub const ROOM_KIB: f64 = 2.5;
/// Per page the counter tracks (KiB).
pub const PAGE_KIB: f64 = 1.0;
/// Per stored page: sled's page table (KiB).
pub const STORED_KIB: f64 = 0.2;

/// The budget in KiB; `None` without `limits.max_connections` (no bound).
pub fn memory_budget_kib(s: &Settings) -> Option<u64> {
    let l = &s.limits;
    if l.max_connections == 0 {
        return None;
    }
    let rooms = l.max_rooms.min(l.max_connections + l.max_idle_rooms);
    Some(
        BASE_KIB
            + s.storage.cache_capacity / 1024
            + (l.max_connections as f64 * CONNECTION_KIB
                + rooms as f64 * ROOM_KIB
                + l.max_pages as f64 * PAGE_KIB
                + s.storage.max_records as f64 * STORED_KIB) as u64,
    )
}
