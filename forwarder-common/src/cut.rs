//! Where `cargo xtask bench` may stop the forwarding paths, to show what
//! each stage costs: the same test packet run through the program cut
//! after each stage in turn. The cut is a read-only global set when the
//! object is loaded; at its default (none) the verifier removes every
//! check of it, so the programs the daemon loads carry none.

macro_rules! cuts {
    ($($variant:ident = $value:literal, $name:literal, $help:literal;)*) => {
        /// A point the forwarding paths (DNAT and reply) may return at,
        /// passing the packet on with nothing counted; only the last cut
        /// comes after the rewrite.
        #[repr(u8)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Cut {
            $($variant = $value,)*
        }

        impl Cut {
            /// In the order a packet meets them.
            pub const ALL: &'static [Cut] = &[$(Cut::$variant,)*];

            /// Short name, for the bench's table and JSON.
            pub const fn name(self) -> &'static str {
                match self {
                    $(Cut::$variant => $name,)*
                }
            }

            /// What the program has done when it stops here, since the
            /// cut before.
            pub const fn help(self) -> &'static str {
                match self {
                    $(Cut::$variant => $help,)*
                }
            }
        }
    };
}

cuts! {
    Entry = 1, "entry", "nothing: the program returns at once (an empty program)";
    Headers = 2, "headers", "Ethernet and IPv4 parsed, the uplink's state read and checked";
    Flow = 3, "flow", "TCP/UDP ports parsed, the flow looked up (for a reply, after the reverse entry)";
    Rule = 4, "rule", "the rule (the flow's, by slot; else by port), the clock, the peer and flow checked";
    Route = 5, "route", "the route: the flow's cached one, or FIB lookups";
    FlowUpdate = 6, "flow update", "the segment checked against the flow and the flow advanced";
    Translate = 7, "translate", "addresses and ports rewritten, checksums updated";
}

/// The global's value for "no cut": the whole program runs.
pub const NONE: u8 = 0;
