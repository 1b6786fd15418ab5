//! Realistic sample users, for the `user-load` load generator and the
//! ceiling benchmark (`benches/ceiling.rs`).
//!
//! Names and an address of about 40 bytes, like the rows of a real import.
//! Making a user costs a few string copies; callers that send millions build
//! a [`UserPool`] once and cycle through it, so that generating load costs
//! less than serving it.

use user_service::proto;

const FIRST_NAMES: &[&str] = &[
    "Olivia",
    "Liam",
    "Emma",
    "Noah",
    "Amelia",
    "Oliver",
    "Sophia",
    "Elijah",
    "Charlotte",
    "Mateo",
    "Isabella",
    "Lucas",
    "Mia",
    "Levi",
    "Evelyn",
    "Asher",
    "Harper",
    "James",
    "Luna",
    "Leo",
    "Camila",
    "Grayson",
    "Gianna",
    "Ezra",
    "Zoë",
    "Søren",
    "Aiko",
    "Chidi",
    "Priya",
    "Tomás",
    "Ngozi",
    "Björn",
];

const LAST_NAMES: &[&str] = &[
    "Smith",
    "Johnson",
    "Williams",
    "Brown",
    "Jones",
    "Garcia",
    "Miller",
    "Davis",
    "Rodriguez",
    "Martinez",
    "Hernandez",
    "Lopez",
    "Gonzalez",
    "Wilson",
    "Anderson",
    "Thomas",
    "Taylor",
    "Moore",
    "Jackson",
    "Martin",
    "Lee",
    "Pérez",
    "Thompson",
    "White",
    "Nakamura",
    "Okafor",
    "Schmidt",
    "Kowalski",
    "Haddad",
    "O'Brien",
    "Van der Berg",
    "Nguyen",
];

const STREETS: &[&str] = &[
    "Maple Avenue",
    "Oak Street",
    "Cedar Lane",
    "Elm Drive",
    "Pine Road",
    "Birch Court",
    "Willow Way",
    "Lakeview Terrace",
    "Sunset Boulevard",
    "Highland Place",
    "Church Street",
    "Mill Road",
];

const CITIES: &[&str] = &[
    "Springfield",
    "Riverside",
    "Fairview",
    "Franklin",
    "Greenville",
    "Bristol",
    "Clinton",
    "Salem",
    "Madison",
    "Georgetown",
    "Ashland",
    "Dover",
];

/// One realistic user with no id, drawn from `rng`.
pub fn user(rng: &mut fastrand::Rng) -> proto::User {
    let address = format!(
        "{} {}, {} {:05}",
        rng.u32(1..10_000),
        STREETS[rng.usize(..STREETS.len())],
        CITIES[rng.usize(..CITIES.len())],
        rng.u32(..100_000),
    );
    proto::User {
        first_name: FIRST_NAMES[rng.usize(..FIRST_NAMES.len())].to_owned(),
        last_name: LAST_NAMES[rng.usize(..LAST_NAMES.len())].to_owned(),
        address,
        verified: rng.bool(),
        id: String::new(),
        version: 0,
    }
}

/// A fixed set of realistic users to cycle through.
#[derive(Debug, Clone)]
pub struct UserPool {
    users: Vec<proto::User>,
}

impl UserPool {
    /// `size` users (at least one), the same ones for the same `seed`.
    pub fn new(size: usize, seed: u64) -> Self {
        let mut rng = fastrand::Rng::with_seed(seed);
        UserPool {
            users: (0..size.max(1)).map(|_| user(&mut rng)).collect(),
        }
    }

    /// The `n`th user, cycling through the pool.
    pub fn get(&self, n: u64) -> &proto::User {
        &self.users[(n % self.users.len() as u64) as usize]
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use user_service::{user::NewUser, validate};

    #[test]
    fn sample_users_are_valid_and_realistic() {
        let pool = UserPool::new(1000, 7);
        let mut address_bytes = 0;
        for n in 0..pool.len() as u64 {
            let user = pool.get(n);
            assert_eq!(validate::new_user(&NewUser::from(user.clone())), Ok(()));
            address_bytes += user.address.len();
        }
        let mean = address_bytes / pool.len();
        assert!((30..=50).contains(&mean), "mean address length {mean}");
    }

    #[test]
    fn the_same_seed_gives_the_same_users() {
        assert_eq!(UserPool::new(10, 1).users, UserPool::new(10, 1).users);
    }
}
