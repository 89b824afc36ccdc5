//! kproxy's XDP and TC entry points. Entry points are thin: each calls a fallible body and
//! counts the reason of every verdict.
#![no_std]
#![no_main]

mod maps;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use kproxy_common::Reason;

/// NodePort / LoadBalancer / externalIP entry on the node's external devices.
#[xdp]
pub fn kp_xdp_ext(_ctx: XdpContext) -> u32 {
    maps::count(Reason::PassNoService);
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
