//! A fingerprint of every map key and value type, so a pinned map is only
//! adopted by a build that reads its bytes the same way. Two types with the
//! same size but reordered or renamed fields get different fingerprints.

/// FNV-1a over bytes, usable in constants.
pub const fn fnv(bytes: &[u8]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0100_0000_01b3);
        i += 1;
    }
    hash
}

/// Folds `value` into `hash`.
pub const fn mix(hash: u64, value: u64) -> u64 {
    let bytes = value.to_le_bytes();
    let mut hash = hash;
    let mut i = 0;
    while i < 8 {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0100_0000_01b3);
        i += 1;
    }
    hash
}

/// A type whose in-memory layout is part of the map layout identity.
pub trait Layout {
    /// Names and types of every field, in order, hashed.
    const LAYOUT: u64;
}

macro_rules! primitive_layout {
    ($($ty:ty),*) => {
        $(impl Layout for $ty {
            const LAYOUT: u64 = fnv(stringify!($ty).as_bytes());
        })*
    };
}

primitive_layout!(u8, u16, u32, u64);

impl<T: Layout, const N: usize> Layout for [T; N] {
    const LAYOUT: u64 = mix(mix(fnv(b"array"), T::LAYOUT), N as u64);
}

/// The fingerprint of a map with keys `K` and values `V`.
pub const fn map_layout<K: Layout, V: Layout>() -> u64 {
    mix(K::LAYOUT, V::LAYOUT)
}

/// What a map definition fixes, as the kernel reports it for a pin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapShape {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

impl core::fmt::Display for MapShape {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "type {}, key {} B, value {} B, {} entries, flags {:#x}",
            self.map_type, self.key_size, self.value_size, self.max_entries, self.flags
        )
    }
}

/// The layout identity of a set of maps, given in name order with their
/// shapes and key and value fingerprints: what build.rs derives from the
/// compiled object and the daemon records beside the pins.
pub fn identity<'a>(maps: impl IntoIterator<Item = (&'a str, MapShape, u64)>) -> u64 {
    let mut hash = fnv(b"forwarder maps");
    for (name, shape, layout) in maps {
        for value in [
            fnv(name.as_bytes()),
            shape.map_type as u64,
            shape.key_size as u64,
            shape.value_size as u64,
            shape.max_entries as u64,
            shape.flags as u64,
            layout,
        ] {
            hash = mix(hash, value);
        }
    }
    hash
}

/// Declares a map key or value struct and its `Layout` from one field
/// list, so the fingerprint cannot drift from the definition.
#[macro_export]
macro_rules! map_type {
    ($(#[$meta:meta])* pub struct $name:ident {
        $($(#[$field_meta:meta])* pub $field:ident: $ty:ty,)*
    }) => {
        $(#[$meta])*
        pub struct $name {
            $($(#[$field_meta])* pub $field: $ty,)*
        }

        impl $crate::layout::Layout for $name {
            const LAYOUT: u64 = {
                let mut hash = $crate::layout::fnv(stringify!($name).as_bytes());
                $(
                    hash = $crate::layout::mix(hash, $crate::layout::fnv(stringify!($field).as_bytes()));
                    hash = $crate::layout::mix(hash, <$ty as $crate::layout::Layout>::LAYOUT);
                )*
                hash
            };
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    crate::map_type! {
        #[repr(C)]
        pub struct A {
            pub x: u32,
            pub y: u16,
            pub z: u16,
        }
    }

    mod renamed {
        crate::map_type! {
            #[repr(C)]
            pub struct A {
                pub x: u32,
                pub z: u16,
                pub y: u16,
            }
        }
    }

    #[test]
    fn reordered_fields_change_the_fingerprint() {
        assert_ne!(A::LAYOUT, renamed::A::LAYOUT);
        assert_eq!(A::LAYOUT, A::LAYOUT);
        assert_ne!(<[u8; 6]>::LAYOUT, <[u8; 7]>::LAYOUT);
        assert_ne!(map_layout::<u32, A>(), map_layout::<A, u32>());
    }
}
